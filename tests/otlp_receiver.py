"""A real OTLP/gRPC trace receiver for tests: what Jaeger's collector does, in-process.

Serves ``opentelemetry.proto.collector.trace.v1.TraceService`` with grpcio on a free
loopback port; processes started with ``receiver.env()`` export their spans to it::

    with OtlpReceiver() as rx:
        subprocess.run(cmd, env={**os.environ, **rx.env()})
        spans = rx.wait_for(lambda s: any(x.name == "work" for x in s), timeout_s=10)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(kvs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


@dataclasses.dataclass(frozen=True)
class ReceivedEvent:
    """A span event (e.g. ``first_token``, ``exception``)."""

    name: str
    attributes: dict[str, Any]
    time_unix_nano: int


@dataclasses.dataclass(frozen=True)
class ReceivedLink:
    """A span link: the linked span's ids (hex) and the link's attributes."""

    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened with its resource. Ids are lowercase hex."""

    service_name: str
    resource: dict[str, Any]
    scope: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind value
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    links: tuple[ReceivedLink, ...]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    start_time_unix_nano: int
    end_time_unix_nano: int

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id

    def event(self, name: str) -> ReceivedEvent | None:
        """The first event called ``name``, if any."""
        return next((e for e in self.events if e.name == name), None)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 — gRPC method name
        self._receiver._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects spans exported over OTLP/gRPC; thread-safe; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._cond = threading.Condition()  # guards _spans and wakes wait_for on each export
        self._spans: list[ReceivedSpan] = []
        self.export_calls = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.host = host
        self._started = False

    @property
    def endpoint(self) -> str:
        """``http://host:port``, the value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment that makes an llmcluster process export here, fast."""
        out = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            # Export within ~100 ms rather than the default 5 s, so tests wait less.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        out.update(extra)
        return out

    def start(self) -> OtlpReceiver:
        if not self._started:
            self._server.start()
            self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._server.stop(grace=None).wait(5)
            self._started = False

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- collection -------------------------------------------------------------------------
    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans: list[ReceivedSpan] = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            service_name=service,
                            resource=resource,
                            scope=ss.scope.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes=_attributes(s.attributes),
                            events=tuple(
                                ReceivedEvent(e.name, _attributes(e.attributes), e.time_unix_nano)
                                for e in s.events
                            ),
                            links=tuple(
                                ReceivedLink(
                                    ln.trace_id.hex(), ln.span_id.hex(), _attributes(ln.attributes)
                                )
                                for ln in s.links
                            ),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            start_time_unix_nano=s.start_time_unix_nano,
                            end_time_unix_nano=s.end_time_unix_nano,
                        )
                    )
        with self._cond:
            self._spans.extend(spans)
            self.export_calls += 1
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of every span received so far."""
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], Any], timeout_s: float = 15.0
    ) -> list[ReceivedSpan]:
        """Blocks until ``predicate(spans)`` is truthy; returns the spans, or raises.

        Woken by each export, so it returns as soon as the batch that satisfies it lands.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                snapshot = list(self._spans)
                if predicate(snapshot):
                    return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(s.service_name, s.name) for s in snapshot})
                    raise TimeoutError(
                        f"OTLP receiver: condition not met in {timeout_s}s; "
                        f"{len(snapshot)} spans received: {names}"
                    )
                self._cond.wait(left)

    def wait_for_span(
        self, name: str, timeout_s: float = 15.0, service_name: str | None = None
    ) -> ReceivedSpan:
        """The first span called ``name`` (optionally from ``service_name``)."""

        def match(s: ReceivedSpan) -> bool:
            return s.name == name and (service_name is None or s.service_name == service_name)

        spans = self.wait_for(lambda ss: any(match(s) for s in ss), timeout_s)
        return next(s for s in spans if match(s))

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Every span received so far in one trace."""
        return [s for s in self.spans if s.trace_id == trace_id]

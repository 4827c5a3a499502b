"""common.tracing: configuration, propagation, sampling, and real OTLP export across processes.

The cross-process tests start plain ``python -c`` processes that use ``common.tracing``
with ``OTEL_*`` pointing at an in-test OTLP/gRPC receiver, and assert on the spans that
arrive: service names, one trace id, parent links across process boundaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from common import tracing as t
from tests.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parents[1]

# The "router": a request span and a routing child; prints the carriers it would send.
ROUTER = textwrap.dedent(
    """
    import json
    from common import tracing as t
    t.setup_tracing(t.SERVICE_ROUTER, t.TracingConfig.from_env())
    tr = t.get_tracer("test.router")
    attrs = t.genai_request_attributes(model="smollm2", max_tokens=8, temperature=0.0)
    with tr.start_as_current_span("router request", attributes=attrs):
        with tr.start_as_current_span("route") as route:
            route.add_event(t.EVENT_RETRY, {"worker": "w1"})
            out = {
                "dict": t.inject_to_dict(),
                "md": t.grpc_metadata_from_context(),
                "trace_id": t.current_trace_id(),
                "route_span_id": format(route.get_span_context().span_id, "016x"),
            }
    t.shutdown_tracing()
    print(json.dumps(out))
    """
)

# The "worker": continues from the dict carrier (WorkItem.trace_context) and from gRPC
# metadata, then starts a "trainer" child process that continues through the environment.
WORKER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from common import tracing as t
    data = json.loads(sys.argv[1])
    trainer_code = sys.argv[2]
    t.setup_tracing(t.SERVICE_WORKER, t.TracingConfig.from_env())
    tr = t.get_tracer("test.worker")
    with tr.start_as_current_span("worker request", context=t.context_from_dict(data["dict"])) as s:
        s.add_event(t.EVENT_FIRST_TOKEN)
        s.set_attributes(t.genai_usage_attributes(input_tokens=5, output_tokens=8,
                                                  finish_reason="LENGTH"))
    with t.server_span(tr, "worker rpc", [tuple(kv) for kv in data["md"]]):
        with tr.start_as_current_span("job"):
            child_env = {**os.environ, **t.subprocess_env()}
            subprocess.run([sys.executable, "-c", trainer_code], env=child_env, check=True)
    t.shutdown_tracing()
    """
)

TRAINER = textwrap.dedent(
    """
    from common import tracing as t
    t.setup_tracing(t.SERVICE_TRAINER, t.TracingConfig.from_env())
    tr = t.get_tracer("test.trainer")
    with t.attached(t.context_from_env()):
        with tr.start_as_current_span("train"):
            with tr.start_as_current_span("epoch 0"):
                pass
    t.shutdown_tracing()
    """
)

# Emits one ordinary root span and one health-check root span.
EMIT = textwrap.dedent(
    """
    import sys
    from common import tracing as t
    t.setup_tracing(t.SERVICE_WORKER, t.TracingConfig.from_env())
    tr = t.get_tracer("test.emit")
    with tr.start_as_current_span("plain " + sys.argv[1]):
        pass
    with tr.start_as_current_span("health " + sys.argv[1], attributes=t.health_span_attributes()):
        pass
    t.shutdown_tracing()
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without OTEL_* / TRACEPARENT leaking in from outside."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "LLMCLUSTER_HEALTH"))
        and k not in ("TRACEPARENT", "TRACESTATE")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def receiver():
    with OtlpReceiver() as rx:
        yield rx


# --- across processes, through a real OTLP receiver -------------------------------------


def test_one_trace_across_router_worker_and_trainer_processes(receiver: OtlpReceiver) -> None:
    env = _clean_env(**receiver.env())
    router_out = json.loads(_run(ROUTER, env))
    assert router_out["dict"]["traceparent"].split("-")[1] == router_out["trace_id"]
    assert [k for k, _ in router_out["md"]] == ["traceparent"]
    # The worker's environment names it explicitly, as compose does; the trainer child must
    # still come out as llmcluster-trainer (subprocess_env overrides the inherited name).
    _run(WORKER, {**env, "OTEL_SERVICE_NAME": t.SERVICE_WORKER}, json.dumps(router_out), TRAINER)

    names = {"router request", "route", "worker request", "worker rpc", "job", "train", "epoch 0"}
    spans = receiver.wait_for(lambda ss: names <= {s.name for s in ss})
    by_name = {s.name: s for s in spans}
    trace_id = router_out["trace_id"]
    assert {s.trace_id for s in spans} == {trace_id}, "all spans must share the router's trace"

    assert by_name["router request"].is_root
    assert by_name["route"].parent_span_id == by_name["router request"].span_id
    # Both carriers point the worker's spans at the router's routing span.
    assert by_name["worker request"].parent_span_id == router_out["route_span_id"]
    assert by_name["worker rpc"].parent_span_id == router_out["route_span_id"]
    assert by_name["job"].parent_span_id == by_name["worker rpc"].span_id
    assert by_name["train"].parent_span_id == by_name["job"].span_id
    assert by_name["epoch 0"].parent_span_id == by_name["train"].span_id

    assert by_name["router request"].service_name == t.SERVICE_ROUTER
    assert by_name["worker request"].service_name == t.SERVICE_WORKER
    assert by_name["train"].service_name == t.SERVICE_TRAINER
    for span in spans:
        assert span.resource["service.version"]
        assert span.resource["service.instance.id"]
    instance_ids = {s.service_name: s.resource["service.instance.id"] for s in spans}
    assert len(set(instance_ids.values())) == 3, "each process is its own instance"

    req = by_name["router request"].attributes
    assert req[t.GEN_AI_REQUEST_MODEL] == "smollm2"
    assert req[t.GEN_AI_REQUEST_MAX_TOKENS] == 8
    worker = by_name["worker request"]
    assert worker.event(t.EVENT_FIRST_TOKEN) is not None
    assert worker.attributes[t.GEN_AI_USAGE_OUTPUT_TOKENS] == 8
    assert worker.attributes[t.GEN_AI_RESPONSE_FINISH_REASONS] == ["length"]
    assert by_name["worker rpc"].kind == trace.SpanKind.SERVER.value + 1  # proto enum is +1
    assert by_name["route"].event(t.EVENT_RETRY).attributes == {"worker": "w1"}


def test_exporter_none_exports_nothing(receiver: OtlpReceiver) -> None:
    base = _clean_env(**receiver.env())
    # Endpoint set, but exporter none: must not export. Runs to completion (and flushes)
    # before the control process starts, so its spans would arrive first if sent.
    _run(EMIT, {**base, "OTEL_TRACES_EXPORTER": "none"}, "silent")
    _run(EMIT, base, "control")
    receiver.wait_for(lambda ss: any(s.name == "plain control" for s in ss))
    assert not [s for s in receiver.spans if s.name.endswith("silent")]


def test_sampler_env_is_respected(receiver: OtlpReceiver) -> None:
    base = _clean_env(**receiver.env())
    _run(EMIT, {**base, "OTEL_TRACES_SAMPLER": "always_off"}, "off")
    _run(
        EMIT,
        {**base, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        "ratio0",
    )
    # Health spans at ratio 0 are dropped while ordinary spans are kept.
    _run(EMIT, {**base, "LLMCLUSTER_HEALTH_SPAN_RATIO": "0"}, "nohealth")
    _run(EMIT, base, "control")
    receiver.wait_for(lambda ss: {"plain control", "health control"} <= {s.name for s in ss})
    names = {s.name for s in receiver.spans}
    assert "plain nohealth" in names
    assert "health nohealth" not in names
    assert not {n for n in names if n.endswith(("off", "ratio0"))}
    health = next(s for s in receiver.spans if s.name == "health control")
    assert health.attributes[t.ATTR_HEALTH_CHECK] is True


def test_parentbased_sampler_follows_a_sampled_remote_parent(receiver: OtlpReceiver) -> None:
    """Ratio 0 for roots, yet a worker continues a trace the router chose to sample."""
    env = _clean_env(**receiver.env())
    router_out = json.loads(_run(ROUTER, env))
    worker_env = {
        **env,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    _run(WORKER, worker_env, json.dumps(router_out), TRAINER)
    receiver.wait_for(lambda ss: {"worker request", "epoch 0"} <= {s.name for s in ss})
    _run(EMIT, worker_env, "unsampled")  # roots under ratio 0: dropped
    _run(EMIT, env, "control")
    receiver.wait_for(lambda ss: any(s.name == "plain control" for s in ss))
    assert not [s for s in receiver.spans if s.name.endswith("unsampled")]


# --- in process: propagation through a real gRPC call, errors, config ------------------


@pytest.fixture
def local_tracer():
    """A tracer on a private provider (the global one is set once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_grpc_metadata_round_trip_through_a_real_server(local_tracer) -> None:
    tracer, _ = local_tracer
    seen: dict[str, trace.SpanContext] = {}

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        ctx = t.context_from_grpc_metadata(context.invocation_metadata())
        seen["parent"] = trace.get_current_span(ctx).get_span_context()
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Echo/Ping")
            with tracer.start_as_current_span("client") as span:
                call(b"x", metadata=t.grpc_metadata_from_context(), timeout=10)
                sent = span.get_span_context()
    finally:
        server.stop(None)
    assert seen["parent"].is_remote
    assert seen["parent"].trace_id == sent.trace_id
    assert seen["parent"].span_id == sent.span_id


def test_empty_carrier_starts_a_new_trace_not_a_child_of_the_current_span(local_tracer) -> None:
    tracer, _ = local_tracer
    with tracer.start_as_current_span("stream"):
        assert not trace.get_current_span(t.context_from_dict({})).get_span_context().is_valid
        assert t.inject_to_dict(t.context_from_dict(None)) == {}


def test_links_from_carriers(local_tracer) -> None:
    tracer, exporter = local_tracer
    with tracer.start_as_current_span("training job") as job:
        traceparent = t.current_traceparent()
    assert t.link_from_traceparent(None) is None
    assert t.link_from_traceparent("garbage") is None
    link = t.link_from_traceparent(traceparent, {t.ATTR_LINK_KIND: "training_job"})
    assert link is not None
    with tracer.start_as_current_span("serve", links=[link]):
        pass
    served = next(s for s in exporter.get_finished_spans() if s.name == "serve")
    assert served.links[0].context.trace_id == job.get_span_context().trace_id
    assert served.links[0].attributes[t.ATTR_LINK_KIND] == "training_job"


def test_record_error_and_server_span_mark_failures(local_tracer) -> None:
    tracer, exporter = local_tracer
    md = [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    with pytest.raises(ValueError):
        with t.server_span(tracer, "rpc", md, attributes={t.ATTR_RPC_METHOD: "Generate"}):
            raise ValueError("prompt too long")
    with tracer.start_as_current_span("manual") as span:
        t.record_error(span, KeyError("adapter"), grpc.StatusCode.NOT_FOUND)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    rpc = spans["rpc"]
    assert rpc.status.status_code == StatusCode.ERROR
    assert "prompt too long" in rpc.status.description
    assert [e.name for e in rpc.events] == ["exception"]
    assert format(rpc.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(rpc.parent.span_id, "016x") == "b7ad6b7169203331"
    assert rpc.kind == trace.SpanKind.SERVER
    manual = spans["manual"]
    assert manual.status.status_code == StatusCode.ERROR
    assert manual.attributes[t.ATTR_RPC_GRPC_STATUS_CODE] == "NOT_FOUND"
    assert manual.attributes[t.ATTR_ERROR_TYPE] == "KeyError"


def test_config_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert t.TracingConfig.from_env().exporter == "none"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317")
    assert t.TracingConfig.from_env().exporter == "otlp", "an endpoint alone turns OTLP on"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    cfg = t.TracingConfig.from_env()
    assert (cfg.exporter, cfg.trace_sampler, cfg.trace_sample_ratio) == (
        "console",
        "parentbased_traceidratio",
        0.25,
    )
    assert cfg.otel_service_name == "custom"
    assert "0.25" in t.build_sampler(cfg).get_description()

    parser = argparse.ArgumentParser()
    t.add_tracing_arguments(parser)
    ns = parser.parse_args(["--trace-exporter", "none", "--health-span-ratio", "0.5"])
    cfg = t.TracingConfig.from_args(ns)
    assert cfg.exporter == "none", "flags override the environment"
    assert cfg.health_span_ratio == 0.5
    assert cfg.otlp_endpoint == "http://jaeger:4317", "unset flags keep the environment"

    with pytest.raises(ValueError, match="trace_exporter='zipkin'"):
        t.TracingConfig(trace_exporter="zipkin")
    with pytest.raises(ValueError, match="health_span_ratio=1.5"):
        t.TracingConfig(health_span_ratio=1.5)


def test_common_does_not_import_torch() -> None:
    code = "import sys, common.tracing, common.metrics; print('torch' in sys.modules)"
    assert _run(code, _clean_env()).strip() == "False"


def test_traced_health_servicer_spans_every_check(local_tracer) -> None:
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tracer, exporter = local_tracer
    serving = health_pb2.HealthCheckResponse.SERVING

    async def scenario() -> list[int]:
        servicer = t.TracedHealthServicer(tracer=tracer)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            await servicer.set("", serving)
            await servicer.set("llmcluster.v1.Generate", health_pb2.HealthCheckResponse.NOT_SERVING)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", "llmcluster.v1.Generate", "nope"):
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
        finally:
            await server.stop(None)
        return codes

    codes = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND]
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["grpc.health.v1.Health/Check"] * 3
    by_service = {s.attributes[t.ATTR_HEALTH_SERVICE]: s for s in spans}
    assert all(s.attributes[t.ATTR_HEALTH_CHECK] for s in spans)
    assert by_service[""].attributes[t.ATTR_HEALTH_STATUS] == "SERVING"
    assert by_service[""].status.status_code == StatusCode.UNSET
    down = by_service["llmcluster.v1.Generate"]
    assert down.attributes[t.ATTR_HEALTH_STATUS] == "NOT_SERVING"
    assert down.status.status_code == StatusCode.ERROR
    assert by_service["nope"].status.status_code == StatusCode.ERROR


def test_setup_is_idempotent_and_shutdown_is_safe_twice() -> None:
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from common import tracing as t
        p1 = t.setup_tracing(t.SERVICE_ROUTER, t.TracingConfig(trace_exporter="none"))
        p2 = t.setup_tracing(t.SERVICE_WORKER)
        assert p1 is p2 is trace.get_tracer_provider()
        assert p1.resource.attributes["service.name"] == "llmcluster-router"
        t.shutdown_tracing()
        t.shutdown_tracing()
        print("ok")
        """
    )
    assert _run(code, _clean_env()).strip() == "ok"

"""Observability end to end, on the real processes: traces exported over OTLP/gRPC to an
in-test receiver (tests/otlp_receiver.py) and Prometheus ``/metrics`` scraped over HTTP.

Default suite (null engine, no model): one streamed request through router -> worker is
one trace with router and worker spans, the right parents, the GenAI attributes and a
``first_token`` event; a health check is a span; ``/metrics`` on both processes shows
TTFT / inter-token histograms and the queue depth moving, and requests counted by code.

Slow (real model): a LoRA job created through the router is one trace holding router,
worker and trainer spans, and a request served with the new adapter links to that trace.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common import tracing as t
from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.procs import Proc, free_port, start_router, start_worker

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER


def _otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """The receiver's env with a short batch delay; anything inherited that would change
    where or whether spans go (sampler, service name, health ratio) is neutralised."""
    env = receiver.env(
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_TRACES_SAMPLER="parentbased_always_on",
        LLMCLUSTER_HEALTH_SPAN_RATIO="1.0",
        **extra,
    )
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "TRACEPARENT"):
        if name in os.environ:
            env[name] = ""
    return env


def _started(proc: Proc, timeout_s: float) -> Proc:
    try:
        proc.wait_healthy(timeout_s=timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc


def _traceparent() -> tuple[str, str]:
    """A fresh sampled W3C traceparent and its trace id (lets a test find its own trace)."""
    trace_id = uuid.uuid4().hex
    return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", trace_id


def _scrape(port: int) -> dict[str, list[Any]]:
    """``/metrics`` as {sample name: [samples]}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout_s}s: {what}")
        time.sleep(0.1)


def _stream(
    stub: generate_pb2_grpc.GenerateStub,
    max_new_tokens: int = 8,
    metadata: list[tuple[str, str]] | None = None,
    **fields: Any,
) -> list[generate_pb2.GenerateStreamResponse]:
    request = generate_pb2.GenerateRequest(
        prompt="Observability is",
        params=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        **fields,
    )
    return list(stub.GenerateStream(request, metadata=metadata, timeout=60))


# ------------------------------------------------------------------ null-engine cluster


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def cluster(receiver: OtlpReceiver) -> Iterator[dict[str, Any]]:
    """A null-engine worker (one running sequence at a time, so a burst queues) and a
    router over it, both exporting to ``receiver`` and serving /metrics."""
    env = _otel_env(receiver)
    worker_metrics, router_metrics = free_port(), free_port()
    worker = _started(
        start_worker(
            "--engine",
            "null",
            "--null-step-ms",
            "20",
            "--max-running",
            "1",
            "--worker-id",
            "obs-worker",
            "--metrics-port",
            str(worker_metrics),
            "--self-test-interval-s",
            "0",
            env=env,
        ),
        120,
    )
    try:
        router = _started(
            start_router([worker.address], "--metrics-port", str(router_metrics), env=env), 120
        )
    except BaseException:
        worker.stop()
        raise
    try:
        with grpc.insecure_channel(router.address) as ch:
            yield {
                "worker": worker,
                "router": router,
                "worker_metrics": worker_metrics,
                "router_metrics": router_metrics,
                "stub": generate_pb2_grpc.GenerateStub(ch),
            }
    finally:
        router.stop()
        worker.stop()


def _descends(span: ReceivedSpan, ancestor: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> bool:
    seen = span
    while seen.parent_span_id:
        if seen.parent_span_id == ancestor.span_id:
            return True
        parent = by_id.get(seen.parent_span_id)
        if parent is None:
            return False
        seen = parent
    return False


def test_streamed_request_is_one_trace_across_router_and_worker(
    cluster: dict[str, Any], receiver: OtlpReceiver
) -> None:
    request_id = f"obs-{uuid.uuid4().hex[:8]}"
    replies = _stream(cluster["stub"], max_new_tokens=8, request_id=request_id)
    last = replies[-1]
    assert last.usage.completion_tokens == 8
    assert last.finish_reason == generate_pb2.LENGTH

    def router_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next(
            (
                s
                for s in spans
                if s.name == "router request" and s.attributes.get(t.ATTR_REQUEST_ID) == request_id
            ),
            None,
        )

    def complete(spans: list[ReceivedSpan]) -> bool:
        root = router_span(spans)
        if root is None:
            return False
        names = {s.name for s in spans if s.trace_id == root.trace_id}
        return {"router request", "route", "worker.request", "queue", "prefill", "decode"} <= names

    spans = receiver.wait_for(complete, timeout_s=30)
    root = router_span(spans)
    assert root is not None
    trace = [s for s in spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: s for s in trace}
    services = {s.service_name for s in trace}
    assert services == {t.SERVICE_ROUTER, t.SERVICE_WORKER}, services

    assert root.is_root, "a client without trace context starts the trace at the router"
    assert root.service_name == t.SERVICE_ROUTER and root.kind == SERVER_KIND
    route = next(s for s in trace if s.name == "route")
    assert route.parent_span_id == root.span_id
    assert route.attributes[t.ATTR_WORKER_ID] == "obs-worker"
    assert route.attributes[t.ATTR_ROUTE_CANDIDATES] == 1
    assert route.attributes[t.ATTR_ROUTE_OUTSTANDING_TOKENS] >= 0
    assert t.ATTR_ROUTE_ADAPTER_LOADED not in route.attributes  # no adapter asked

    (worker,) = [s for s in trace if s.name == "worker.request"]
    assert worker.service_name == t.SERVICE_WORKER
    parent = by_id[worker.parent_span_id]
    assert parent.service_name == t.SERVICE_ROUTER, "the worker's span hangs off a router span"
    assert parent is route or _descends(parent, root, by_id)
    for child in ("queue", "prefill", "decode"):
        (span,) = [s for s in trace if s.name == child]
        assert span.parent_span_id == worker.span_id, child
        assert span.service_name == t.SERVICE_WORKER

    # GenAI semantic conventions, on the worker's request span and the router's.
    for span in (worker, root):
        a = span.attributes
        assert a[t.GEN_AI_REQUEST_MAX_TOKENS] == 8, span.name
        assert a[t.GEN_AI_USAGE_INPUT_TOKENS] == last.usage.prompt_tokens > 0, span.name
        assert a[t.GEN_AI_USAGE_OUTPUT_TOKENS] == 8, span.name
        assert list(a[t.GEN_AI_RESPONSE_FINISH_REASONS]) == ["length"], span.name
        assert t.GEN_AI_REQUEST_MODEL in a, span.name
        assert span.event(t.EVENT_FIRST_TOKEN) is not None, span.name
    served = worker.attributes[t.GEN_AI_RESPONSE_MODEL]
    assert served and served != "default"
    assert worker.attributes[t.GEN_AI_REQUEST_MODEL] == served, "no model asked: the served one"
    assert worker.attributes[t.ATTR_WORKER_ID] == "obs-worker"
    # The SubmitBatch the request rode in is linked, not parented, both ways.
    (batch_link,) = [ln for ln in worker.links if ln.attributes.get(t.ATTR_LINK_KIND) == "batch"]
    spans = receiver.wait_for(
        lambda ss: any(s.span_id == batch_link.span_id for s in ss), timeout_s=30
    )
    batch = next(s for s in spans if s.span_id == batch_link.span_id)
    assert batch.name == "worker.batch" and batch.service_name == t.SERVICE_WORKER
    assert batch.trace_id == batch_link.trace_id != root.trace_id and batch.is_root
    assert batch.attributes[t.ATTR_BATCH_SIZE] >= 1
    assert any(ln.span_id == worker.parent_span_id for ln in batch.links), batch.links
    first = worker.event(t.EVENT_FIRST_TOKEN)
    assert first is not None
    assert worker.start_time_unix_nano <= first.time_unix_nano <= worker.end_time_unix_nano
    assert root.start_time_unix_nano <= worker.start_time_unix_nano
    assert worker.status_code != 2 and root.status_code != 2


def test_client_trace_context_is_continued(cluster: dict[str, Any], receiver: OtlpReceiver) -> None:
    """A client that sends a traceparent sees router and worker spans in its own trace."""
    traceparent, trace_id = _traceparent()
    _stream(cluster["stub"], max_new_tokens=3, metadata=[("traceparent", traceparent)])
    spans = receiver.wait_for(
        lambda ss: (
            {"router request", "worker.request"} <= {s.name for s in ss if s.trace_id == trace_id}
        ),
        timeout_s=30,
    )
    root = next(s for s in spans if s.trace_id == trace_id and s.name == "router request")
    assert root.parent_span_id == traceparent.split("-")[2]


def test_health_check_produces_a_span(cluster: dict[str, Any], receiver: OtlpReceiver) -> None:
    worker: Proc = cluster["worker"]
    traceparent, trace_id = _traceparent()
    probe = f"e2e-probe-{uuid.uuid4().hex[:6]}"
    with grpc.insecure_channel(worker.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(
            health_pb2.HealthCheckRequest(service=""),
            metadata=[("traceparent", traceparent)],
            timeout=10,
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service=probe), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    def found(spans: list[ReceivedSpan]) -> bool:
        return any(s.trace_id == trace_id for s in spans) and any(
            s.attributes.get(t.ATTR_HEALTH_SERVICE) == probe for s in spans
        )

    spans = receiver.wait_for(found, timeout_s=30)
    (ok,) = [s for s in spans if s.trace_id == trace_id]
    assert ok.name == "grpc.health.v1.Health/Check"
    assert ok.service_name == t.SERVICE_WORKER and ok.kind == SERVER_KIND
    assert ok.parent_span_id == traceparent.split("-")[2]
    assert ok.attributes[t.ATTR_HEALTH_CHECK] is True
    assert ok.attributes[t.ATTR_HEALTH_STATUS] == "SERVING"
    assert ok.status_code != 2
    # A check without trace context is a root span of its own; unknown service = error.
    (missing,) = [s for s in spans if s.attributes.get(t.ATTR_HEALTH_SERVICE) == probe]
    assert missing.is_root and missing.service_name == t.SERVICE_WORKER
    assert missing.status_code == 2


def test_metrics_move_after_traffic(cluster: dict[str, Any]) -> None:
    stub: generate_pb2_grpc.GenerateStub = cluster["stub"]
    wport, rport = cluster["worker_metrics"], cluster["router_metrics"]
    before_w, before_r = _scrape(wport), _scrape(rport)

    # The worker has one running slot. A long stream holds it (gated on its first token,
    # so the queueing below does not depend on how fast threads start on a busy machine);
    # the short ones sent meanwhile must wait in the worker's queue.
    errors: list[BaseException] = []
    holding = threading.Event()

    def long_one() -> None:
        request = generate_pb2.GenerateRequest(
            prompt="Observability is",
            params=generate_pb2.SamplingParams(max_new_tokens=150, temperature=0.0),
        )
        try:
            messages = []
            for message in stub.GenerateStream(request, timeout=90):
                messages.append(message)
                holding.set()
            assert messages and messages[-1].usage.completion_tokens == 150
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            holding.set()

    def one() -> None:
        try:
            assert _stream(stub, max_new_tokens=6)[-1].usage.completion_tokens == 6
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=long_one)]
    threads[0].start()
    assert holding.wait(60), "the long stream never produced a token"
    assert not errors, errors
    threads += [threading.Thread(target=one) for _ in range(4)]
    for th in threads[1:]:
        th.start()
    depth = _wait(
        lambda: _total(_scrape(wport), "llmcluster_queue_depth") > 0,
        timeout_s=30,
        what="worker queue depth > 0 while its one slot is held",
    )
    assert depth
    for th in threads:
        th.join(90)
    assert not errors, errors

    # One INVALID_ARGUMENT through the router and one straight at the worker.
    bad = generate_pb2.GenerateRequest(
        prompt="x", params=generate_pb2.SamplingParams(max_new_tokens=4, temperature=-1.0)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(bad, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(cluster["worker"].address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(generate_pb2_grpc.GenerateStub(ch).GenerateStream(bad, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The worker counts finished requests when the engine reports them; wait, don't sleep.
    def settled() -> tuple[dict[str, list[Any]], dict[str, list[Any]]] | None:
        w, r = _scrape(wport), _scrape(rport)
        ok = _total(w, "llmcluster_requests_total", code="OK") - _total(
            before_w, "llmcluster_requests_total", code="OK"
        )
        return (w, r) if ok >= 5 and _total(w, "llmcluster_queue_depth") == 0 else None

    after_w, after_r = _wait(settled, timeout_s=30, what="worker counted the burst")

    for name, before, after in (("worker", before_w, after_w), ("router", before_r, after_r)):

        def moved(metric: str, *, b: Any = before, a: Any = after, **labels: str) -> float:
            return _total(a, metric, **labels) - _total(b, metric, **labels)

        assert moved("llmcluster_time_to_first_token_seconds_count") >= 5, name
        assert moved("llmcluster_time_to_first_token_seconds_sum") > 0, name
        # Four 6-token streams have 5 gaps each, the long one 149.
        assert moved("llmcluster_inter_token_latency_seconds_count") >= 5 * 5, name
        assert moved("llmcluster_inter_token_latency_seconds_sum") > 0, name
        buckets = [
            s
            for s in after["llmcluster_time_to_first_token_seconds_bucket"]
            if s.labels["le"] != "+Inf"
        ]
        assert len(buckets) >= 8, f"{name}: TTFT needs LLM-latency buckets"
        assert "llmcluster_queue_depth" in after, name
        assert moved("llmcluster_requests_total", code="OK") >= 5, name
        assert moved("llmcluster_requests_total", code="INVALID_ARGUMENT") >= 1, name
    # The router forwarded only the good ones: the worker saw its bad one directly.
    assert _total(after_w, "llmcluster_queue_time_seconds_count") > _total(
        before_w, "llmcluster_queue_time_seconds_count"
    )
    assert (
        _total(after_w, "llmcluster_generation_tokens_total")
        - _total(before_w, "llmcluster_generation_tokens_total")
        >= 5 * 6
    )
    assert _total(after_w, "llmcluster_batch_size_count") > _total(
        before_w, "llmcluster_batch_size_count"
    )


# ------------------------------------------------------------------ train -> serve (real model)


@pytest.mark.slow
def test_finetune_job_is_one_trace_and_its_adapter_links_to_it(tmp_path: Path) -> None:
    from tests.test_finetune import small_hp, small_jsonl, temp_home

    home = temp_home(tmp_path)
    with OtlpReceiver() as receiver:
        worker = _started(
            start_worker(
                "--dtype",
                "float32",
                "--worker-id",
                "obs-ft-worker",
                "--self-test-interval-s",
                "0",
                env={**_otel_env(receiver), "LLMCLUSTER_HOME": str(home)},
            ),
            300,
        )
        router: Proc | None = None
        try:
            router = _started(start_router([worker.address], env=_otel_env(receiver)), 120)
            # Through the router: the job's trace then spans router, worker and trainer.
            with grpc.insecure_channel(router.address) as ch:
                ft = finetune_pb2_grpc.FineTuneStub(ch)
                job = ft.CreateJob(
                    finetune_pb2.CreateJobRequest(
                        output_name="obs-bot",
                        dataset_jsonl=small_jsonl(),
                        hyperparameters=small_hp(),
                    ),
                    timeout=60,
                )
                events = list(
                    ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300)
                )
                final = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
                assert final.state == finetune_pb2.SUCCEEDED, events[-3:]
                assert final.artifact.ref == "obs-bot@1"
                job_trace = final.trace_id
                assert len(job_trace) == 32 and job.trace_id == job_trace

                gen = generate_pb2_grpc.GenerateStub(ch)
                request_id = f"obs-adapter-{uuid.uuid4().hex[:6]}"
                reply = gen.Generate(
                    generate_pb2.GenerateRequest(
                        request_id=request_id,
                        prompt="Text: Kofi (45) works in Lagos.\nRecord:",
                        adapter="obs-bot@1",
                        params=generate_pb2.SamplingParams(max_new_tokens=4, temperature=0.0),
                    ),
                    timeout=120,
                )
                assert reply.usage.completion_tokens > 0

            want = {"finetune job", "finetune artifact publication"}

            def job_done(spans: list[ReceivedSpan]) -> bool:
                names = {s.name for s in spans if s.trace_id == job_trace}
                return want <= names and any(
                    s.name == "worker.request" and s.attributes.get(t.ATTR_REQUEST_ID) == request_id
                    for s in spans
                )

            spans = receiver.wait_for(job_done, timeout_s=60)
        finally:
            if router is not None:
                router.stop()
            worker.stop()

    trace = [s for s in spans if s.trace_id == job_trace]
    by_id = {s.span_id: s for s in trace}
    assert {s.service_name for s in trace} == {
        t.SERVICE_ROUTER,
        t.SERVICE_WORKER,
        t.SERVICE_TRAINER,
    }
    (proxy,) = [s for s in trace if s.is_root]
    assert proxy.service_name == t.SERVICE_ROUTER and proxy.name.endswith("CreateJob")
    (create,) = [
        s for s in trace if s.service_name == t.SERVICE_WORKER and s.name.endswith("CreateJob")
    ]
    assert create.kind == SERVER_KIND and _descends(create, proxy, by_id)
    assert create.attributes[t.ATTR_JOB_ID] == job.job_id
    (job_span,) = [s for s in trace if s.name == "finetune job"]
    assert job_span.service_name == t.SERVICE_TRAINER
    assert job_span.parent_span_id == create.span_id, "the job continues the CreateJob trace"
    trainer = [s for s in trace if s.service_name == t.SERVICE_TRAINER]
    assert len(trainer) >= 3, sorted(s.name for s in trainer)  # job, phases/epochs, publication
    for span in trainer:
        assert span is job_span or _descends(span, job_span, by_id), span.name
    assert any("epoch" in s.name for s in trainer), sorted(s.name for s in trainer)

    (served,) = [
        s
        for s in spans
        if s.name == "worker.request" and s.attributes.get(t.ATTR_REQUEST_ID) == request_id
    ]
    assert served.trace_id != job_trace, "serving is its own trace, linked not parented"
    assert any(
        s.service_name == t.SERVICE_ROUTER and s.span_id == served.parent_span_id for s in spans
    ), "served through the router"
    assert served.attributes[t.ATTR_ADAPTER] == "obs-bot@1"
    training = [ln for ln in served.links if ln.attributes.get(t.ATTR_LINK_KIND) == "training_job"]
    assert len(training) == 1, served.links
    assert training[0].trace_id == job_trace

"""common.metrics: drive the metrics, scrape /metrics over HTTP, parse the exposition."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import (
    JOB_STATES,
    RouterMetrics,
    WorkerMetrics,
    start_metrics_server,
    status_code_name,
)
from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import free_port, start_router, start_worker


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and flatten every sample to {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def worker() -> tuple[WorkerMetrics, int]:
    metrics = WorkerMetrics()
    return metrics, start_metrics_server(0, metrics.registry, host="127.0.0.1")


@pytest.fixture
def router() -> tuple[RouterMetrics, int]:
    metrics = RouterMetrics()
    return metrics, start_metrics_server(0, metrics.registry, host="127.0.0.1")


def test_worker_metrics_move_after_traffic(worker) -> None:
    metrics, port = worker
    assert port > 0
    before = scrape(port)
    assert value(before, "llmcluster_time_to_first_token_seconds_count") == 0
    assert value(before, "llmcluster_finetune_jobs", state="RUNNING") == 0

    for ttft in (0.003, 0.05, 0.2):
        metrics.observe_ttft(ttft)
    metrics.observe_inter_token(0.02)
    metrics.observe_inter_token(0.03, count=3)
    metrics.observe_queue_time(0.001)
    metrics.observe_request_done(e2e_s=1.2, prompt_tokens=7, generation_tokens=16)
    metrics.record_request("GenerateStream", grpc.StatusCode.OK)
    metrics.record_request("GenerateStream", grpc.StatusCode.INVALID_ARGUMENT)
    metrics.record_request("GenerateStream")
    for size in (1, 4, 4):
        metrics.observe_step(size)
    engine_stats = {
        "queued": 5,
        "running": 4,
        "reserved_kv_tokens": 256,
        "occupied_kv_tokens": 64,
        "max_kv_tokens": 1024,
    }
    metrics.follow_engine(lambda: engine_stats)  # what Engine.stats returns, read per scrape
    metrics.loaded_adapters.set(2)
    metrics.set_jobs_by_state({"RUNNING": 1, "SUCCEEDED": 3})
    metrics.set_training_loss("job-1", 1.75)
    metrics.record_self_test(True)
    metrics.record_self_test(False)
    metrics.set_healthy(True)
    metrics.record_request("GenerateStream", grpc.StatusCode.CANCELLED)
    metrics.record_request("Serve", "DEADLINE_EXCEEDED")

    after = scrape(port)
    assert value(after, "llmcluster_time_to_first_token_seconds_count") == 3
    assert value(after, "llmcluster_time_to_first_token_seconds_sum") == pytest.approx(0.253)
    assert value(after, "llmcluster_time_to_first_token_seconds_bucket", le="0.005") == 1
    assert value(after, "llmcluster_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(after, "llmcluster_inter_token_latency_seconds_count") == 4
    assert value(after, "llmcluster_inter_token_latency_seconds_bucket", le="0.01") == 3
    assert value(after, "llmcluster_queue_time_seconds_count") == 1
    assert value(after, "llmcluster_e2e_request_latency_seconds_count") == 1
    assert value(after, "llmcluster_prompt_tokens_total") == 7
    assert value(after, "llmcluster_generation_tokens_total") == 16
    assert value(after, "llmcluster_request_generation_tokens_count") == 1
    ok = {"role": "worker", "method": "GenerateStream", "code": "OK"}
    assert value(after, "llmcluster_requests_total", **ok) == 2
    assert value(after, "llmcluster_requests_total", **{**ok, "code": "INVALID_ARGUMENT"}) == 1
    assert value(after, "llmcluster_engine_steps_total") == 3
    assert value(after, "llmcluster_batch_size_count") == 3
    assert value(after, "llmcluster_batch_size_sum") == 9
    assert value(after, "llmcluster_queue_depth") == 5
    assert value(after, "llmcluster_running_sequences") == 4
    assert value(after, "llmcluster_kv_cache_reserved_ratio") == 0.25
    assert value(after, "llmcluster_kv_cache_reserved_tokens") == 256
    assert value(after, "llmcluster_kv_cache_occupied_tokens") == 64
    assert value(after, "llmcluster_kv_cache_occupied_ratio") == 0.0625
    assert value(after, "llmcluster_healthy") == 1
    assert value(after, "llmcluster_cancellations_total", reason="cancelled") == 1
    assert value(after, "llmcluster_cancellations_total", reason="deadline") == 1
    assert value(after, "llmcluster_loaded_adapters") == 2
    assert value(after, "llmcluster_finetune_jobs", state="RUNNING") == 1
    assert value(after, "llmcluster_finetune_jobs", state="SUCCEEDED") == 3
    assert value(after, "llmcluster_finetune_jobs", state="FAILED") == 0
    assert value(after, "llmcluster_training_loss", job="job-1") == 1.75
    assert value(after, "llmcluster_self_tests_total", result="pass") == 1
    assert value(after, "llmcluster_self_tests_total", result="fail") == 1
    assert value(after, "llmcluster_build_info", role="worker", version=_version()) == 1

    engine_stats.update(queued=0, running=0, reserved_kv_tokens=0, occupied_kv_tokens=0)
    idle = scrape(port)
    assert value(idle, "llmcluster_running_sequences") == 0  # no step needed to see it
    assert value(idle, "llmcluster_kv_cache_occupied_ratio") == 0

    metrics.clear_job("job-1")
    metrics.clear_job("job-1")  # idempotent
    assert ("llmcluster_training_loss", (("job", "job-1"),)) not in scrape(port)


def test_router_metrics_move_after_traffic(router) -> None:
    metrics, port = router
    metrics.observe_submit_batch(3)
    metrics.observe_submit_batch(1)
    metrics.set_discovery(ok=True, passing_workers=2)
    metrics.set_discovery(ok=False)
    metrics.retries_total.inc()
    metrics.record_request("GenerateStream", "UNAVAILABLE")
    metrics.observe_ttft(0.1)
    metrics.queue_depth.set(7)

    after = scrape(port)
    assert value(after, "llmcluster_router_submit_batches_total") == 2
    assert value(after, "llmcluster_router_batched_requests_total") == 4
    assert value(after, "llmcluster_router_requests_per_batch_count") == 2
    assert value(after, "llmcluster_router_requests_per_batch_bucket", le="1.0") == 1
    assert value(after, "llmcluster_router_registry_workers") == 2
    assert value(after, "llmcluster_router_registry_up") == 0
    assert value(after, "llmcluster_router_discovery_failures_total") == 1
    assert value(after, "llmcluster_router_retries_total") == 1
    labels = {"role": "router", "method": "GenerateStream", "code": "UNAVAILABLE"}
    assert value(after, "llmcluster_requests_total", **labels) == 1
    # The router's latency histograms say which API a request came in by.
    assert value(after, "llmcluster_time_to_first_token_seconds_count", api="grpc") == 1
    assert value(after, "llmcluster_time_to_first_token_seconds_count", api="openai") == 0
    metrics.observe_request_done(e2e_s=0.5, prompt_tokens=2, generation_tokens=3, api="openai")
    openai_series = value(
        scrape(port), "llmcluster_e2e_request_latency_seconds_count", api="openai"
    )
    assert openai_series == 1
    assert value(after, "llmcluster_queue_depth") == 7
    # The router's registry holds no worker-only series.
    assert not [k for k in after if k[0].startswith("llmcluster_kv_cache")]


def test_genai_histograms_use_the_semantic_conventions_buckets(router) -> None:
    """gen_ai.* in Prometheus form, with the ExplicitBucketBoundaries the OpenTelemetry
    GenAI conventions prescribe, observed once per successful request."""
    metrics, port = router
    before = scrape(port)
    assert value(before, "llmcluster_cancellations_total", reason="cancelled") == 0
    metrics.observe_request_done(
        e2e_s=1.3, prompt_tokens=5, generation_tokens=11, ttft_s=0.3, operation="chat"
    )
    metrics.observe_request_done(e2e_s=0.05, prompt_tokens=3, generation_tokens=0, ttft_s=None)
    after = scrape(port)

    def buckets(name: str, **labels: str) -> list[float]:
        return sorted(
            float(dict(k[1])["le"])
            for k in after
            if k[0] == name + "_bucket"
            and dict(k[1])["le"] != "+Inf"
            and all(dict(k[1]).get(a) == b for a, b in labels.items())
        )

    chat = {"gen_ai_operation_name": "chat"}
    assert buckets("gen_ai_server_time_to_first_token_seconds", **chat) == [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ]  # fmt: skip
    assert buckets("gen_ai_server_time_per_output_token_seconds", **chat) == [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    ]  # fmt: skip
    assert buckets("gen_ai_server_request_duration_seconds", **chat) == [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ]  # fmt: skip
    assert buckets("gen_ai_client_token_usage", gen_ai_token_type="input", **chat) == [
        float(4**i) for i in range(14)
    ]
    assert value(after, "gen_ai_server_time_to_first_token_seconds_sum", **chat) == 0.3
    # (1.3 - 0.3) s over the 10 tokens after the first.
    assert value(after, "gen_ai_server_time_per_output_token_seconds_sum", **chat) == pytest.approx(
        0.1
    )
    assert value(after, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **chat) == 11
    text = {"gen_ai_operation_name": "text_completion"}
    assert value(after, "gen_ai_server_request_duration_seconds_count", **text) == 1
    assert ("gen_ai_server_time_to_first_token_seconds_count", tuple(text.items())) not in after


def test_registries_are_per_instance() -> None:
    """Two objects in one process (tests, `llmcluster up`) must not share or clash."""
    a, b = WorkerMetrics(), WorkerMetrics()
    a.observe_step(2)
    assert a.registry is not b.registry
    assert b.engine_steps_total._value.get() == 0


def test_status_code_name() -> None:
    assert status_code_name(grpc.StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert status_code_name("ok") == "OK"
    assert status_code_name(14) == "UNAVAILABLE"
    assert status_code_name(None) == "OK"
    assert set(JOB_STATES) >= {"RUNNING", "SUCCEEDED", "FAILED"}


def _version() -> str:
    from common.tracing import package_version

    return package_version()


# ------------------------------------------------- real processes: each series moves on its event


def _wait_for(predicate, timeout_s: float, what: str, port: int):
    """Polls a scrape until ``predicate(samples)`` holds; fails naming ``what``."""
    deadline = time.monotonic() + timeout_s
    samples = scrape(port)
    while not predicate(samples):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
        samples = scrape(port)
    return samples


def test_cancel_deadline_and_health_flips_move_metrics_of_real_processes(tmp_path) -> None:
    """A null-engine worker and a router over it, scraped over /metrics: a cancelled
    stream and a missed deadline count as cancellations on both, a successful request
    fills the gen_ai histograms, and a wedged engine turns llmcluster_healthy to 0 on
    the worker and (its only worker gone) on the router, and back to 1 on recovery."""
    env = {"LLMCLUSTER_HOME": str(tmp_path / "home")}
    fault = tmp_path / "wedge"
    wport, rport = free_port(), free_port()
    worker = start_worker(
        "--engine", "null", "--null-step-ms", "5", "--worker-id", "metrics-worker",
        "--metrics-port", str(wport), "--fault-file", str(fault),
        "--self-test-interval-s", "0.5", "--self-test-timeout-s", "1",
        env=env,
    )  # fmt: skip
    procs = [worker]
    try:
        worker.wait_healthy(120)
        router = start_router([worker.address], "--metrics-port", str(rport), env=env)
        procs.append(router)
        router.wait_healthy(60)
        for port in (wport, rport):
            _wait_for(lambda s: value(s, "llmcluster_healthy") == 1, 30, "healthy=1", port)
        cancelled = {"reason": "cancelled"}
        assert value(scrape(rport), "llmcluster_cancellations_total", **cancelled) == 0

        with grpc.insecure_channel(router.address) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            long = generate_pb2.GenerateRequest(
                prompt="count", params=generate_pb2.SamplingParams(max_new_tokens=2000)
            )
            # A successful request: the gen_ai histograms move.
            ok = generate_pb2.GenerateRequest(
                prompt="hi", params=generate_pb2.SamplingParams(max_new_tokens=4)
            )
            assert stub.Generate(ok, timeout=30).usage.completion_tokens == 4
            # A client that cancels after its first message.
            call = stub.GenerateStream(long, timeout=60)
            assert next(call).tokens
            # While it runs: its reservation (prompt + 2000) covers what the cache holds.
            running = _wait_for(
                lambda s: value(s, "llmcluster_kv_cache_occupied_tokens") > 1,
                30,
                "KV occupancy of the running stream",
                wport,
            )
            occupied = value(running, "llmcluster_kv_cache_occupied_tokens")
            assert value(running, "llmcluster_kv_cache_reserved_tokens") >= 2000 > occupied
            call.cancel()
            # The cancelled stream leaves the engine: nothing runs, nothing is held.
            _wait_for(
                lambda s: (
                    value(s, "llmcluster_running_sequences") == 0
                    and value(s, "llmcluster_kv_cache_occupied_tokens") == 0
                    and value(s, "llmcluster_kv_cache_reserved_tokens") == 0
                ),
                30,
                "the engine empty after the cancel",
                wport,
            )
            # A deadline that passes mid-stream.
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.GenerateStream(long, timeout=0.5):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        text = {"gen_ai_operation_name": "text_completion"}
        for port in (rport, wport):
            after = _wait_for(
                lambda s: value(s, "llmcluster_cancellations_total", **cancelled) >= 1,
                30,
                "a cancellation",
                port,
            )
            assert value(after, "gen_ai_server_request_duration_seconds_count", **text) >= 1
            assert value(after, "gen_ai_server_time_to_first_token_seconds_count", **text) >= 1
            out = {**text, "gen_ai_token_type": "output"}
            assert value(after, "gen_ai_client_token_usage_sum", **out) >= 4
        _wait_for(
            lambda s: value(s, "llmcluster_cancellations_total", reason="deadline") >= 1,
            30,
            "a deadline counted by the router",
            rport,
        )

        fault.touch()  # the engine hangs: the self-test fails, health flips
        _wait_for(lambda s: value(s, "llmcluster_healthy") == 0, 30, "worker healthy=0", wport)
        _wait_for(lambda s: value(s, "llmcluster_healthy") == 0, 30, "router healthy=0", rport)
        fault.unlink()
        _wait_for(lambda s: value(s, "llmcluster_healthy") == 1, 60, "worker healthy=1", wport)
        _wait_for(lambda s: value(s, "llmcluster_healthy") == 1, 60, "router healthy=1", rport)
    finally:
        for proc in reversed(procs):
            proc.stop()

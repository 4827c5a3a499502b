"""common.metrics: drive the metrics, scrape /metrics over HTTP, parse the exposition."""

from __future__ import annotations

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
    metrics.set_engine_state(waiting=5, running=4, kv_used_tokens=256, kv_capacity_tokens=1024)
    metrics.loaded_adapters.set(2)
    metrics.set_jobs_by_state({"RUNNING": 1, "SUCCEEDED": 3})
    metrics.set_training_loss("job-1", 1.75)
    metrics.record_self_test(True)
    metrics.record_self_test(False)
    metrics.healthy.set(1)

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
    assert value(after, "llmcluster_kv_cache_usage_ratio") == 0.25
    assert value(after, "llmcluster_kv_cache_used_tokens") == 256
    assert value(after, "llmcluster_loaded_adapters") == 2
    assert value(after, "llmcluster_finetune_jobs", state="RUNNING") == 1
    assert value(after, "llmcluster_finetune_jobs", state="SUCCEEDED") == 3
    assert value(after, "llmcluster_finetune_jobs", state="FAILED") == 0
    assert value(after, "llmcluster_training_loss", job="job-1") == 1.75
    assert value(after, "llmcluster_self_tests_total", result="pass") == 1
    assert value(after, "llmcluster_self_tests_total", result="fail") == 1
    assert value(after, "llmcluster_build_info", role="worker", version=_version()) == 1

    metrics.clear_job("job-1")
    metrics.clear_job("job-1")  # idempotent
    assert ("llmcluster_training_loss", (("job", "job-1"),)) not in scrape(port)


def test_router_metrics_move_after_traffic(router) -> None:
    metrics, port = router
    metrics.observe_submit_batch(3)
    metrics.observe_submit_batch(1)
    metrics.set_discovery(ok=True, healthy_workers=2)
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
    assert value(after, "llmcluster_router_healthy_workers") == 2
    assert value(after, "llmcluster_router_registry_up") == 0
    assert value(after, "llmcluster_router_discovery_failures_total") == 1
    assert value(after, "llmcluster_router_retries_total") == 1
    labels = {"role": "router", "method": "GenerateStream", "code": "UNAVAILABLE"}
    assert value(after, "llmcluster_requests_total", **labels) == 1
    assert value(after, "llmcluster_time_to_first_token_seconds_count") == 1
    assert value(after, "llmcluster_queue_depth") == 7
    # The router's registry holds no worker-only series.
    assert not [k for k in after if k[0].startswith("llmcluster_kv_cache")]


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

"""Router + workers discovering each other through Consul (the in-process stand-in of
the agent's HTTP API; a real ``consul agent -dev`` is exercised in test_registry.py).

Workers run the null engine: these tests are about discovery, health and drain, and the
model path is covered by the worker and router tests."""

from __future__ import annotations

import os
import signal
import threading
import time

import consul
import grpc
import pytest

from common.pb import generate_pb2, generate_pb2_grpc
from tests.consul_standin import ConsulStandin, wait_for
from tests.procs import Proc, start_router, start_worker

CHECK_INTERVAL = "0.3"


@pytest.fixture(scope="module")
def agent():
    standin = ConsulStandin(check_reap_interval_s=0.1, check_deregister_interval_min_s=0).start()
    yield standin
    standin.close()


def consul_flags(agent) -> list[str]:
    return [
        "--registry",
        "consul",
        "--consul-addr",
        agent.addr,
        "--consul-check-interval-s",
        CHECK_INTERVAL,
        "--consul-check-timeout-s",
        "1",
        "--consul-retry-max-s",
        "0.5",
    ]


def null_worker(agent, worker_id: str, *extra: str) -> Proc:
    return start_worker(
        "--engine",
        "null",
        "--null-step-ms",
        "20",
        "--worker-id",
        worker_id,
        "--max-running",
        "64",
        *consul_flags(agent),
        *extra,
    )


def passing_ids(agent) -> set[str]:
    client = consul.Consul(host="127.0.0.1", port=int(agent.addr.rsplit(":", 1)[1]))
    _, entries = client.health.service("llmcluster-worker", passing=True)
    return {e["Service"]["ID"] for e in entries}


@pytest.fixture(scope="module")
def cluster(agent):
    procs = [null_worker(agent, "w1"), null_worker(agent, "w2")]
    router = start_router([], *consul_flags(agent))
    procs.append(router)
    try:
        for p in procs:
            p.wait_healthy(timeout_s=120)
        yield router, procs
    finally:
        for p in procs:
            p.stop()


def generate(router: Proc, max_new_tokens: int = 4, timeout_s: float = 30.0):
    with grpc.insecure_channel(router.address) as ch:
        stub = generate_pb2_grpc.GenerateStub(ch)
        msgs = list(
            stub.GenerateStream(
                generate_pb2.GenerateRequest(
                    prompt="hello",
                    params=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens),
                ),
                timeout=timeout_s,
            )
        )
    return msgs[-1].usage.worker_id


def test_a_worker_started_later_gets_traffic_within_2s_of_passing(agent, cluster):
    router, procs = cluster
    wait_for(
        lambda: {"llmcluster-worker-w1", "llmcluster-worker-w2"} <= passing_ids(agent), 30, "w1,w2"
    )
    late = null_worker(agent, "w3")
    procs.append(late)
    passed_at = wait_for(lambda: "llmcluster-worker-w3" in passing_ids(agent), 120, "w3 passing")
    served = wait_for(lambda: generate(router) == "w3", 10, "a request served by w3", poll_s=0)
    assert served - passed_at < 2.0, f"w3 got traffic {served - passed_at:.2f}s after passing"


def test_sigterm_drains_a_worker_under_16_streams(agent, cluster):
    router, procs = cluster
    victim = next(p for p in procs if "w3" in p.args)
    results: list[str | Exception] = []
    lock = threading.Lock()

    def stream():
        try:
            worker = generate(router, max_new_tokens=80, timeout_s=60)
        except Exception as exc:  # recorded, asserted below
            worker = exc
        with lock:
            results.append(worker)

    threads = [threading.Thread(target=stream) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # streams are mid-way (80 tokens x 20 ms) when the drain starts
    victim.signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(results) == 16
    wait_for(lambda: "llmcluster-worker-w3" not in passing_ids(agent), 15, "w3 deregistered")
    victim.popen.wait(30)
    assert victim.popen.returncode == 0, victim.output()[-2000:]
    assert all(generate(router) != "w3" for _ in range(10))


def test_consul_outage_under_load_fails_nothing_and_discovery_resumes(agent, cluster):
    router, procs = cluster
    agent.stop()
    try:
        deadline = time.monotonic() + 10
        served = set()
        while time.monotonic() < deadline:
            served.add(generate(router))
        assert served <= {"w1", "w2"} and served
    finally:
        agent.start()
    late = null_worker(agent, "w4")
    procs.append(late)
    wait_for(lambda: "llmcluster-worker-w4" in passing_ids(agent), 120, "w4 passing")
    wait_for(lambda: generate(router) == "w4", 15, "w4 discovered after the outage", poll_s=0)


def test_a_hung_engine_turns_not_serving_and_leaves_the_routing_set(agent, cluster, tmp_path):
    router, procs = cluster
    fault = tmp_path / "hang"
    hung = null_worker(
        agent,
        "w5",
        "--fault-file",
        str(fault),
        "--self-test-interval-s",
        "1",
        "--self-test-timeout-s",
        "2",
    )
    procs.append(hung)
    hung.wait_healthy(60)
    wait_for(lambda: "llmcluster-worker-w5" in passing_ids(agent), 30, "w5 passing")
    fault.touch()
    # One interval to notice plus the probe's timeout, then Consul's next check.
    wait_for(lambda: "llmcluster-worker-w5" not in passing_ids(agent), 10, "w5 leaving")
    assert all(generate(router) != "w5" for _ in range(10))
    os.remove(fault)
    wait_for(lambda: "llmcluster-worker-w5" in passing_ids(agent), 30, "w5 recovered")


def test_sigkill_turns_the_check_critical_and_routing_stops(agent, cluster):
    router, procs = cluster
    victim = null_worker(agent, "w6")
    procs.append(victim)
    wait_for(lambda: "llmcluster-worker-w6" in passing_ids(agent), 120, "w6 passing")
    wait_for(lambda: generate(router) == "w6", 15, "w6 serving", poll_s=0)
    victim.signal(signal.SIGKILL)
    wait_for(lambda: "llmcluster-worker-w6" not in passing_ids(agent), 15, "w6 critical")
    # Requests keep succeeding on the others (failover covers any caught mid-flight).
    assert all(generate(router) != "w6" for _ in range(10))

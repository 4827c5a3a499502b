"""Traffic splits of an adapter's versions (issue 21): two published LoRA versions of
``support-bot`` on the real default model, split 90/10.

The 1,000-caller statistics run on the resolution function the worker calls for every
request (``AdapterSet.resolve``, which reads the split from the store); a real router
and worker then serve a few dozen one-token generations, whose usage must name the
version that served them, sticky per ``user``, with ``support-bot@1`` bypassing the
split, and the worker's per-version Prometheus series count them.
"""

from __future__ import annotations

import math
import random
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.model_store import ModelStore, pick_version, split_point
from common.models import DEFAULT_MODEL, load_model, resolve_model
from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.conftest import new_home
from tests.procs import REPO_ROOT, Proc, free_port, start_router, start_worker
from tests.test_adapters import make_lora
from tests.test_fuzz import CLIENT_ERRORS
from tests.test_fuzz import NAMES as FUZZ_NAMES
from worker.adapters import AdapterSet

NAME = "support-bot"
SPLIT = {1: 90, 2: 10}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose store holds support-bot@1 and support-bot@2 (random LoRAs)."""
    home = new_home(tmp_path_factory.mktemp("split-home"))
    model, _ = load_model(resolve_model(None), dtype="float32")
    store = ModelStore(home / "store")
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"lora-{seed}")
        make_lora(model, folder, seed)
        store.publish(NAME, folder, {"base_model": DEFAULT_MODEL, "method": "lora"})
    return home


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[tuple[Proc, Proc, int, int]]:
    metrics_port = free_port()
    router_metrics_port = free_port()
    worker = start_worker(
        "--dtype",
        "float32",
        "--worker-id",
        "split-worker",
        "--self-test-interval-s",
        "0",
        "--metrics-port",
        str(metrics_port),
        env={"LLMCLUSTER_HOME": str(home)},
    )
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address], "--metrics-port", str(router_metrics_port))
        router.wait_healthy(timeout_s=60, service="llmcluster.v1.FineTune")
        yield router, worker, metrics_port, router_metrics_port
    finally:
        if router is not None:
            router.stop()
        worker.signal(signal.SIGTERM)
        worker.stop()


@pytest.fixture(scope="module")
def channel(cluster: tuple[Proc, Proc, int, int]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster[0].address) as ch:
        yield ch


def _samples(port: int, name: str) -> dict[tuple[str, str], float]:
    """(adapter, version) → value of the ``name`` samples for support-bot with code OK
    (when the series has a code label) scraped from a /metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[tuple[str, str], float] = {}
    for line in text.decode().splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("adapter") == NAME and labels.get("code", "OK") == "OK":
                out[(labels["adapter"], labels["version"])] = float(line.rsplit(" ", 1)[1])
    return out


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_set_split_validates_and_round_trips_through_the_router(channel: grpc.Channel) -> None:
    ft = finetune_pb2_grpc.FineTuneStub(channel)
    bad = [
        ({1: 90, 2: 20}, grpc.StatusCode.INVALID_ARGUMENT, "sum to 100, got 110"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "weights are empty"),
        ({0: 100}, grpc.StatusCode.INVALID_ARGUMENT, "version 0 must be an integer >= 1"),
        ({1: 50, 3: 50}, grpc.StatusCode.NOT_FOUND, "version(s) 3 not found"),
    ]
    for weights, code, text in bad:
        got = _code(
            lambda w=weights: ft.SetTrafficSplit(
                finetune_pb2.SetTrafficSplitRequest(adapter=NAME, weights=w), timeout=30
            )
        )
        assert got[0] == code and text in got[1], (weights, got)
    got = _code(
        lambda: ft.SetTrafficSplit(
            finetune_pb2.SetTrafficSplitRequest(adapter="no-such-bot", weights={1: 100}),
            timeout=30,
        )
    )
    assert got[0] == grpc.StatusCode.NOT_FOUND and "no-such-bot" in got[1], got
    got = _code(
        lambda: ft.SetTrafficSplit(
            finetune_pb2.SetTrafficSplitRequest(adapter=f"{NAME}@2", weights={1: 100}),
            timeout=30,
        )
    )
    assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and "bare name" in got[1], got

    split = ft.SetTrafficSplit(
        finetune_pb2.SetTrafficSplitRequest(adapter=NAME, weights=SPLIT), timeout=30
    )
    assert dict(split.weights) == SPLIT and split.updated_unix_ms > 0
    got_back = ft.GetTrafficSplit(finetune_pb2.GetTrafficSplitRequest(adapter=NAME), timeout=30)
    assert dict(got_back.weights) == SPLIT


def test_a_90_10_split_over_1000_callers(home: Path, channel: grpc.Channel) -> None:
    """The worker's own resolution path on the split the router just stored."""
    ft = finetune_pb2_grpc.FineTuneStub(channel)
    ft.SetTrafficSplit(finetune_pb2.SetTrafficSplitRequest(adapter=NAME, weights=SPLIT), timeout=30)
    adapters = AdapterSet(ModelStore(home / "store"), DEFAULT_MODEL)
    keys = [f"user-{i}" for i in range(1000)]
    first = {key: adapters.resolve(f"{NAME}@latest", key).version for key in keys}
    share = Counter(first.values())[2] / len(keys)
    assert 0.06 <= share <= 0.14, share
    # Sticky: the same key, asked again (bare name or @latest), gets the same version.
    for key in keys[:200]:
        assert adapters.resolve(NAME, key).version == first[key]
        assert adapters.resolve(f"{NAME}@latest", key).version == first[key]
    # Pinned versions bypass the split for every key.
    assert {adapters.resolve(f"{NAME}@1", key).version for key in keys} == {1}
    assert {adapters.resolve(f"{NAME}@2", key).version for key in keys} == {2}
    # No key: each request draws; both versions come up (P(no v2 in 300) ~ 2e-14).
    assert {adapters.resolve(NAME).version for _ in range(300)} == {1, 2}


def _generate(gen, adapter: str, user: str) -> generate_pb2.GenerateResponse:
    return gen.Generate(
        generate_pb2.GenerateRequest(
            adapter=adapter,
            prompt="Hello",
            user=user,
            params=generate_pb2.SamplingParams(max_new_tokens=1),
        ),
        timeout=120,
    )


def test_served_version_is_in_usage_sticky_and_pinned_bypasses(
    channel: grpc.Channel, cluster: tuple[Proc, Proc, int, int]
) -> None:
    ft = finetune_pb2_grpc.FineTuneStub(channel)
    ft.SetTrafficSplit(finetune_pb2.SetTrafficSplitRequest(adapter=NAME, weights=SPLIT), timeout=30)
    gen = generate_pb2_grpc.GenerateStub(channel)
    expected = {
        f"caller-{i}": pick_version(SPLIT, split_point(f"caller-{i}", NAME)) for i in range(200)
    }
    # Enough callers of each version to see both (10 % of 200 keys fall on version 2).
    v2 = [k for k, v in expected.items() if v == 2][:6]
    v1 = [k for k, v in expected.items() if v == 1][:10]
    assert len(v2) == 6
    served: dict[str, set[str]] = {}
    for key in v1 + v2:
        for _ in range(2):  # each caller twice: the same version both times
            reply = _generate(gen, NAME, key)
            assert reply.usage.completion_tokens == 1
            served.setdefault(key, set()).add(reply.usage.adapter)
    for key, refs in served.items():
        assert refs == {f"{NAME}@{expected[key]}"}, (key, refs)
    for key in v2[:4]:  # a caller the split sends to 2, pinned to 1
        assert _generate(gen, f"{NAME}@1", key).usage.adapter == f"{NAME}@1"
    base = _generate(gen, "", "caller-0")
    assert base.usage.adapter == ""

    # The worker's per-version series count what it served.
    counts = _samples(cluster[2], "llmcluster_adapter_requests_total")
    assert counts.get((NAME, "2"), 0) >= 2 * len(v2), counts
    assert counts.get((NAME, "1"), 0) >= 2 * len(v1) + 4, counts
    ttft = _samples(cluster[2], "llmcluster_adapter_time_to_first_token_seconds_count")
    assert ttft.get((NAME, "2"), 0) >= 2 * len(v2), ttft

    # Feedback on a request counts toward the version that served it (the router's book).
    scored = {1: 0.0, 2: 1.0}
    for version, key in ((1, v1[0]), (2, v2[0]), (2, v2[1])):
        reply = _generate(gen, NAME, key)
        fb = gen.RecordFeedback(
            generate_pb2.RecordFeedbackRequest(request_id=reply.request_id, score=scored[version]),
            timeout=30,
        )
        assert fb.adapter == f"{NAME}@{version}" == reply.usage.adapter
    sums = _samples(cluster[3], "llmcluster_feedback_score_sum")
    numbers = _samples(cluster[3], "llmcluster_feedback_score_count")
    assert numbers == {(NAME, "1"): 1.0, (NAME, "2"): 2.0}, numbers
    assert sums == {(NAME, "1"): 0.0, (NAME, "2"): 2.0}, sums
    for request, code in (
        (generate_pb2.RecordFeedbackRequest(request_id="never-sent", score=1), "NOT_FOUND"),
        (generate_pb2.RecordFeedbackRequest(request_id=reply.request_id, score=float("nan")),
         "INVALID_ARGUMENT"),
        (generate_pb2.RecordFeedbackRequest(score=1), "INVALID_ARGUMENT"),
    ):  # fmt: skip
        got = _code(lambda r=request: gen.RecordFeedback(r, timeout=30))
        assert got[0].name == code, got

    # A worker answers RecordFeedback for the requests it served directly.
    with grpc.insecure_channel(cluster[1].address) as direct:
        worker_gen = generate_pb2_grpc.GenerateStub(direct)
        reply = _generate(worker_gen, f"{NAME}@1", "direct")
        fb = worker_gen.RecordFeedback(
            generate_pb2.RecordFeedbackRequest(request_id=reply.request_id, score=0.5), timeout=30
        )
        assert fb.adapter == f"{NAME}@1"
    assert _samples(cluster[2], "llmcluster_feedback_score_sum") == {(NAME, "1"): 0.5}

    # Cleared: the latest version serves every caller again.
    ft.SetTrafficSplit(finetune_pb2.SetTrafficSplitRequest(adapter=NAME, clear=True), timeout=30)
    for key in v1[:3]:
        assert _generate(gen, NAME, key).usage.adapter == f"{NAME}@2"


def test_cli_sets_shows_and_clears(cluster: tuple[Proc, Proc, int, int]) -> None:
    target = cluster[0].address

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmcluster", "adapters", "split", *args, "--target", target],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )

    done = cli(NAME, "1=90", "2=10")
    assert done.returncode == 0, done.stderr
    assert f"{NAME}@1 90%" in done.stdout and f"{NAME}@2 10%" in done.stdout
    shown = cli(NAME)
    assert shown.returncode == 0 and f"{NAME}@2 10%" in shown.stdout, shown
    refused = cli(NAME, "1=90", "2=20")
    assert refused.returncode == 2 and "sum to 100, got 110" in refused.stderr
    missing = cli(NAME, "1=50", "7=50")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr, missing.stderr
    cleared = cli(NAME, "--clear")
    assert cleared.returncode == 0 and "no split" in cleared.stdout, cleared


def test_hostile_split_feedback_and_sweep_calls_get_client_errors(
    cluster: tuple[Proc, Proc, int, int], channel: grpc.Channel, home: Path
) -> None:
    """Seeded hostile SetTrafficSplit / GetTrafficSplit / RecordFeedback and sweep-id
    calls through the router: each ends OK or with a client-error status (never INTERNAL
    or UNKNOWN), path-like names reach no file, and the worker stays SERVING."""
    rng = random.Random(21)
    ft = finetune_pb2_grpc.FineTuneStub(channel)
    gen = generate_pb2_grpc.GenerateStub(channel)
    weights_pool = [0, 1, 10, 50, 90, 100, 101, 2**31, 2**32 - 1]
    versions_pool = [0, 1, 2, 3, 2**31, 2**32 - 1]
    scores = [0.0, 1.0, -1.0, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324]
    calls = []
    for _ in range(120):
        name = rng.choice([*FUZZ_NAMES, NAME])
        kind = rng.randrange(7)
        if kind == 0:
            weights = {rng.choice(versions_pool): rng.choice(weights_pool) for _ in range(3)}
            request = finetune_pb2.SetTrafficSplitRequest(adapter=name, weights=weights)
            calls.append(lambda r=request: ft.SetTrafficSplit(r, timeout=30))
        elif kind == 1:
            many = {v: 1 for v in range(1, rng.choice([2, 101, 5000]))}
            request = finetune_pb2.SetTrafficSplitRequest(adapter=name, weights=many)
            calls.append(lambda r=request: ft.SetTrafficSplit(r, timeout=30))
        elif kind == 2:
            request = finetune_pb2.SetTrafficSplitRequest(adapter=name, clear=True)
            calls.append(lambda r=request: ft.SetTrafficSplit(r, timeout=30))
        elif kind == 3:
            request = finetune_pb2.GetTrafficSplitRequest(adapter=name)
            calls.append(lambda r=request: ft.GetTrafficSplit(r, timeout=30))
        elif kind == 4:
            request = generate_pb2.RecordFeedbackRequest(
                request_id=rng.choice(FUZZ_NAMES), score=rng.choice(scores)
            )
            calls.append(lambda r=request: gen.RecordFeedback(r, timeout=30))
        elif kind == 5:
            sweep_id = rng.choice(FUZZ_NAMES)
            calls.append(
                lambda s=sweep_id: ft.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=s), timeout=30)
            )
            calls.append(
                lambda s=sweep_id: ft.CancelSweep(
                    finetune_pb2.CancelSweepRequest(sweep_id=s), timeout=30
                )
            )
        else:
            sweep_id = rng.choice(FUZZ_NAMES)
            request = finetune_pb2.WatchSweepRequest(
                sweep_id=sweep_id, from_sequence=rng.choice([0, 2**64 - 1])
            )
            calls.append(lambda r=request: list(ft.WatchSweep(r, timeout=30)))
    codes: Counter[grpc.StatusCode] = Counter()
    for call in calls:
        try:
            call()
            codes[grpc.StatusCode.OK] += 1
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
            codes[exc.code()] += 1
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0 and codes[grpc.StatusCode.NOT_FOUND] > 0
    # Hostile names made nothing in the store: it still holds the one adapter.
    assert [p.name for p in (home / "store").iterdir()] == [NAME]
    cluster[1].wait_healthy(timeout_s=30)
    ft.SetTrafficSplit(finetune_pb2.SetTrafficSplitRequest(adapter=NAME, clear=True), timeout=30)

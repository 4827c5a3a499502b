"""FineTune through the router, over two real workers sharing one model store.

The workers share ``store/`` (the intended deployment: an adapter trained on one is
servable by all) but each has its own jobs folder, so a job lives on exactly one
worker and the router has to route later calls to it. One tiny LoRA job runs; a
second one is created while it is active (so it must land on the other, idle worker)
and cancelled at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.procs import Proc, start_router, start_worker
from tests.test_finetune import small_hp, small_jsonl, states, temp_home

FINETUNE = "llmcluster.v1.FineTune"


def _start_worker(home: Path, worker_id: str) -> Proc:
    return start_worker(
        "--dtype",
        "float32",
        "--worker-id",
        worker_id,
        "--jobs-dir",
        str(home / f"jobs-{worker_id}"),
        "--self-test-interval-s",
        "0",
        env={"LLMCLUSTER_HOME": str(home)},
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return temp_home(tmp_path_factory.mktemp("router-ft-home"))


@pytest.fixture(scope="module")
def workers(home: Path) -> Iterator[dict[str, Proc]]:
    procs = {wid: _start_worker(home, wid) for wid in ("ft-a", "ft-b")}
    try:
        for proc in procs.values():  # started together: the two loads overlap
            proc.wait_healthy(timeout_s=300)
        yield procs
    finally:
        for proc in procs.values():  # SIGTERM both first: the drains overlap
            proc.signal(signal.SIGTERM)
        for proc in procs.values():
            proc.stop()


def _router(workers: dict[str, Proc]) -> Proc:
    proc = start_router([p.address for p in workers.values()])
    try:
        proc.wait_healthy(timeout_s=60, service=FINETUNE)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="module")
def router(workers: dict[str, Proc]) -> Iterator[Proc]:
    proc = _router(workers)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def channel(router: Proc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(router.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def ft(channel: grpc.Channel) -> finetune_pb2_grpc.FineTuneStub:
    return finetune_pb2_grpc.FineTuneStub(channel)


@pytest.fixture(scope="module")
def job_story(
    ft: finetune_pb2_grpc.FineTuneStub,
) -> tuple[finetune_pb2.Job, finetune_pb2.Job, list[finetune_pb2.JobEvent]]:
    """Job 1 trained to the end; job 2 created while job 1 is active, then cancelled."""
    request = finetune_pb2.CreateJobRequest(
        output_name="routed-bot",
        dataset_jsonl=small_jsonl(),
        hyperparameters=small_hp(max_steps=2, checkpoint_every_steps=0),
        client_token="router-ft-1",
    )
    job = ft.CreateJob(request, timeout=60)
    # The same token again reaches the same worker, whose idempotency returns the job.
    assert ft.CreateJob(request, timeout=60).job_id == job.job_id
    other = ft.CreateJob(
        finetune_pb2.CreateJobRequest(
            output_name="routed-other", dataset_jsonl=small_jsonl(), hyperparameters=small_hp()
        ),
        timeout=60,
    )
    cancelled = ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=other.job_id), timeout=30)
    assert cancelled.job_id == other.job_id
    events = list(ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
    return job, other, events


def test_health_and_reflection_name_the_finetune_service(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=FINETUNE), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_input_is_invalid_argument_with_the_workers_message(ft) -> None:
    cases = [
        (finetune_pb2.Hyperparameters(lora_r=0), "bot", "lora_r"),
        (finetune_pb2.Hyperparameters(), "../x", "output_name"),
    ]
    for hp, name, needle in cases:
        request = finetune_pb2.CreateJobRequest(
            output_name=name, dataset_jsonl=small_jsonl(4), hyperparameters=hp
        )
        with pytest.raises(grpc.RpcError) as info:
            ft.CreateJob(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        ft.GetJob(finetune_pb2.GetJobRequest(job_id=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_job_is_not_found(ft) -> None:
    calls = [
        lambda: ft.GetJob(finetune_pb2.GetJobRequest(job_id="ft-nope"), timeout=10),
        lambda: ft.CancelJob(finetune_pb2.CancelJobRequest(job_id="ft-nope"), timeout=10),
        lambda: list(ft.WatchJob(finetune_pb2.WatchJobRequest(job_id="ft-nope"), timeout=10)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "ft-nope" in info.value.details()


def test_jobs_are_spread_and_watch_tells_the_whole_story(ft, job_story) -> None:
    job, other, events = job_story
    # Job 1 was active on its worker, so the second job went to the idle one.
    assert {job.worker_id, other.worker_id} == {"ft-a", "ft-b"}
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    artifact = next(e.artifact for e in events if e.WhichOneof("event") == "artifact")
    assert artifact.ref == "routed-bot@1"

    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert got.state == finetune_pb2.SUCCEEDED and got.worker_id == job.worker_id
    assert got.artifact.ref == "routed-bot@1"
    gone = ft.GetJob(finetune_pb2.GetJobRequest(job_id=other.job_id), timeout=10)
    assert gone.state == finetune_pb2.CANCELLED and gone.worker_id == other.worker_id


def test_list_jobs_merges_workers_newest_first(ft, job_story) -> None:
    job, other, _ = job_story
    jobs = ft.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs
    assert [j.job_id for j in jobs] == [other.job_id, job.job_id]
    assert {j.worker_id for j in jobs} == {"ft-a", "ft-b"}
    newest = ft.ListJobs(finetune_pb2.ListJobsRequest(limit=1), timeout=10).jobs
    assert [j.job_id for j in newest] == [other.job_id]
    done = ft.ListJobs(finetune_pb2.ListJobsRequest(state=finetune_pb2.SUCCEEDED), timeout=10)
    assert [j.job_id for j in done.jobs] == [job.job_id]


def test_new_adapter_is_served_through_the_router(channel, job_story) -> None:
    # Either worker can serve it (shared store); the policy prefers the one that has it
    # loaded already.
    reply = generate_pb2_grpc.GenerateStub(channel).Generate(
        generate_pb2.GenerateRequest(
            prompt="Text: Kofi (45) works in Lagos.\nRecord:",
            adapter="routed-bot@1",
            params=generate_pb2.SamplingParams(max_new_tokens=4, temperature=0.0),
        ),
        timeout=120,
    )
    assert reply.usage.completion_tokens > 0


def test_a_fresh_router_finds_jobs_by_asking_the_workers(workers, job_story) -> None:
    job, other, _ = job_story
    fresh = _router(workers)  # an empty routing table, as after a router restart
    try:
        with grpc.insecure_channel(fresh.address) as ch:
            stub = finetune_pb2_grpc.FineTuneStub(ch)
            for j in (job, other):
                got = stub.GetJob(finetune_pb2.GetJobRequest(job_id=j.job_id), timeout=10)
                assert got.worker_id == j.worker_id
            tail = list(
                stub.WatchJob(
                    finetune_pb2.WatchJobRequest(job_id=job.job_id, from_sequence=2), timeout=30
                )
            )
            assert tail[0].sequence == 2 and states(tail)[-1] == "SUCCEEDED"
    finally:
        fresh.stop()


def test_prompt_tuning_and_bottleneck_jobs_are_served_through_the_router_beside_base_and_lora(
    channel, ft, job_story
) -> None:
    """A prompt-tuning job's and a bottleneck job's artifacts answer through the router;
    requests for the base model, the LoRA adapter, the prompt-tuned and the bottleneck
    one sent together each give the tokens they give alone (greedy)."""
    jobs = [
        ft.CreateJob(
            finetune_pb2.CreateJobRequest(
                method=method,
                output_name=name,
                dataset_jsonl=small_jsonl(),
                hyperparameters=small_hp(max_steps=2, checkpoint_every_steps=0, **extra),
            ),
            timeout=60,
        )
        for method, name, extra in (
            (finetune_pb2.PROMPT_TUNING, "routed-soft", {"num_virtual_tokens": 4}),
            (finetune_pb2.BOTTLENECK, "routed-neck", {"bottleneck_size": 16}),
        )
    ]
    for job in jobs:
        events = list(ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
        assert states(events)[-1] == "SUCCEEDED", events[-1]
    gen = generate_pb2_grpc.GenerateStub(channel)

    def greedy(adapter: str) -> tuple[list[int], list[float]]:
        reply = gen.Generate(
            generate_pb2.GenerateRequest(
                prompt="Text: Kofi (45) works in Lagos.\nRecord:",
                adapter=adapter,
                params=generate_pb2.SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=1),
            ),
            timeout=120,
        )
        assert reply.usage.adapter == adapter
        return [t.id for t in reply.tokens], [round(t.logprob, 4) for t in reply.tokens]

    adapters = ["", "routed-bot@1", "routed-soft@1", "routed-neck@1"]
    alone = [greedy(a) for a in adapters]
    assert alone[2][0] != alone[0][0]
    # Two steps move a zero-initialised bottleneck a little: its logprobs differ from base.
    assert alone[3][1][0] != alone[0][1][0]
    with ThreadPoolExecutor(len(adapters) * 2) as pool:
        together = list(pool.map(greedy, adapters * 2))
    assert [ids for ids, _ in together] == [ids for ids, _ in alone] * 2

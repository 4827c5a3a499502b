"""Two real worker processes on one shared job store (one LLMCLUSTER_HOME): a job runs
exactly once, under one lease holder, and is visible on both; SIGKILL its worker mid-job
and the other one takes it over once the lease expires and completes it from the last
checkpoint."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from common.pb import finetune_pb2, finetune_pb2_grpc
from tests.conftest import new_home
from tests.procs import Proc, start_router, start_worker
from tests.test_finetune import small_hp, small_jsonl, states, watch_all
from worker.jobs import LEASE_HOLDER_LOG

LEASE_S = 2
FINETUNE = "llmcluster.v1.FineTune"


def start(home: Path, worker_id: str) -> Proc:
    return start_worker(
        "--dtype",
        "float32",
        "--worker-id",
        worker_id,
        "--max-running",
        "4",
        "--job-lease-s",
        str(LEASE_S),
        env={"LLMCLUSTER_HOME": str(home)},
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_home(tmp_path_factory.mktemp("shared-home"))


@pytest.fixture(scope="module")
def workers(home: Path):
    procs = [start(home, "worker-a"), start(home, "worker-b")]  # both start at once
    try:
        for proc in procs:
            proc.wait_healthy(timeout_s=300)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def stub(proc: Proc) -> tuple[grpc.Channel, finetune_pb2_grpc.FineTuneStub]:
    channel = grpc.insecure_channel(proc.address)
    return channel, finetune_pb2_grpc.FineTuneStub(channel)


def holders(events: list[finetune_pb2.JobEvent]) -> list[str]:
    """The lease holder log events, in order."""
    return [e.log for e in events if e.WhichOneof("event") == "log" and LEASE_HOLDER_LOG in e.log]


def start_job_past_a_checkpoint(proc: Proc, output_name: str) -> finetune_pb2.Job:
    """Creates a 6-step job on ``proc`` and returns once it has a checkpoint at step 2."""
    channel, ft = stub(proc)
    with channel:
        job = ft.CreateJob(
            finetune_pb2.CreateJobRequest(
                output_name=output_name,
                dataset_jsonl=small_jsonl(),
                hyperparameters=small_hp(max_steps=6),
            ),
            timeout=60,
        )
        for event in ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
            if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step >= 2:
                return job
    raise AssertionError(f"job {job.job_id} ended before its step-2 checkpoint")


def wait_for(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def test_a_job_runs_exactly_once(workers: list[Proc], home: Path) -> None:
    a, b = workers
    ch_a, ft_a = stub(a)
    ch_b, ft_b = stub(b)
    with ch_a, ch_b:
        job = ft_a.CreateJob(
            finetune_pb2.CreateJobRequest(
                output_name="once-bot", dataset_jsonl=small_jsonl(), hyperparameters=small_hp()
            ),
            timeout=60,
        )
        events = watch_all(ft_a, job.job_id)
        assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
        assert holders(events) == [f"{LEASE_HOLDER_LOG} worker worker-a holds the job (epoch 1)"]
        steps = [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"]
        assert steps == [1, 2, 3]  # one trainer: each step once

        # The other worker mirrors it from the shared store: same job, same holder, and
        # its WatchJob replays the same events.
        got_b = wait_for(
            lambda: (
                g
                if (g := ft_b.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10))
                and g.state == finetune_pb2.SUCCEEDED
                else None
            ),
            30,
            "worker-b sees the job succeeded",
        )
        assert got_b.worker_id == "worker-a" and got_b.artifact.ref == "once-bot@1"
        assert [e.sequence for e in watch_all(ft_b, job.job_id, 30)] == [e.sequence for e in events]
        assert ft_a.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id)).worker_id == "worker-a"

    job_dir = home / "jobs" / job.job_id
    progress = [json.loads(line) for line in (job_dir / "progress.jsonl").read_text().splitlines()]
    assert sum("stateChange" in p for p in progress) == 1  # one process ran it
    assert sorted(p.name for p in job_dir.glob("lease.*")) == ["lease.1"]  # never taken over
    # Let go once its process has exited (a little after the terminal event).
    lease = wait_for(
        lambda: d if (d := json.loads((job_dir / "lease.1").read_text()))["released"] else None,
        30,
        "the finished job's lease is released",
    )
    assert lease["worker_id"] == "worker-a"
    assert [p.name for p in (home / "store" / "once-bot").iterdir() if p.name.isdigit()] == ["1"]


def test_router_places_by_held_jobs_and_a_mirror_cancels(workers: list[Proc]) -> None:
    """Through a router, a second job goes to the worker that holds none (each worker
    lists every job of the shared store; the router counts those it holds). CancelJob
    on the worker that only mirrors a job reaches its holder."""
    router = start_router([p.address for p in workers])
    try:
        router.wait_healthy(timeout_s=60, service=FINETUNE)
        channel, ft = stub(router)
        with channel:

            def create(name: str) -> finetune_pb2.Job:
                return ft.CreateJob(
                    finetune_pb2.CreateJobRequest(
                        output_name=name,
                        dataset_jsonl=small_jsonl(),
                        hyperparameters=small_hp(max_steps=200, checkpoint_every_steps=0),
                    ),
                    timeout=60,
                )

            first = create("placed-1")
            other = workers[1] if first.worker_id == "worker-a" else workers[0]
            ch_o, ft_o = stub(other)
            with ch_o:  # both workers list it now: counting all would make them equal
                wait_for(
                    lambda: (
                        first.job_id
                        in [j.job_id for j in ft_o.ListJobs(finetune_pb2.ListJobsRequest()).jobs]
                    ),
                    30,
                    "the other worker lists the first job",
                )
            second = create("placed-2")
            assert {first.worker_id, second.worker_id} == {"worker-a", "worker-b"}
            by_id = {"worker-a": workers[0], "worker-b": workers[1]}
            for job in (first, second):
                holder = by_id[job.worker_id]
                mirror = by_id[({"worker-a", "worker-b"} - {job.worker_id}).pop()]
                ch_h, ft_h = stub(holder)
                ch_m, ft_m = stub(mirror)
                with ch_h, ch_m:
                    stream = ft_h.WatchJob(
                        finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300
                    )
                    seen = []
                    for event in stream:
                        seen.append(event)
                        if event.WhichOneof("event") == "metrics":
                            break
                    # The mirror may not have loaded a brand-new job yet: retry NOT_FOUND.
                    wait_for(
                        lambda job=job, ft_m=ft_m: _cancel(ft_m, job.job_id),
                        30,
                        "the mirror accepts CancelJob",
                    )
                    seen.extend(stream)
                    assert states(seen) == ["QUEUED", "RUNNING", "CANCELLED"], seen[-1]
                    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
                    assert got.state == finetune_pb2.CANCELLED
    finally:
        router.stop()


def _cancel(ft: finetune_pb2_grpc.FineTuneStub, job_id: str) -> bool:
    try:
        ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=job_id), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


def test_sigkilled_worker_s_job_is_taken_over_after_the_lease_expires(
    workers: list[Proc], home: Path
) -> None:
    a, b = workers
    job = start_job_past_a_checkpoint(a, "takeover-bot")
    # The worker's process group; its trainer (own session) exits when its parent dies.
    a.signal(signal.SIGKILL)
    killed_ms = int(time.time() * 1000)
    a.popen.wait(10)

    ch_b, ft_b = stub(b)
    with ch_b:
        events = watch_all(ft_b, job.job_id)
        got = ft_b.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert states(events) == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
    took = holders(events)
    assert took[0] == f"{LEASE_HOLDER_LOG} worker worker-a holds the job (epoch 1)"
    assert len(took) == 2 and re.fullmatch(
        rf"{LEASE_HOLDER_LOG} worker worker-b took the job over from worker worker-a "
        rf"\(epoch 2\): the lease of worker worker-a expired \({LEASE_S} s\)",
        took[1],
    ), took
    takeover = next(e for e in events if e.WhichOneof("event") == "log" and e.log == took[1])
    # Not before the lease ran out: worker-a renewed it at most lease_s / 3 before dying.
    assert takeover.time_unix_ms - killed_ms >= LEASE_S * 1000 * 2 / 3 - 100
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    assert any("resuming from checkpoint at step" in line for line in logs), logs
    steps = [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"]
    assert steps[-1] == 6 and steps.count(1) == 1  # resumed, not restarted
    assert got.state == finetune_pb2.SUCCEEDED and got.worker_id == "worker-b"
    assert got.artifact.ref == "takeover-bot@1"
    assert (home / "store" / "takeover-bot" / "1" / "metadata.json").exists()
    meta = json.loads((home / "store" / "takeover-bot" / "1" / "metadata.json").read_text())
    assert meta["job_id"] == job.job_id


@pytest.mark.slow  # two more worker starts and a job: about a minute on its own
def test_workers_starting_at_once_never_both_take_a_job(workers: list[Proc], home: Path) -> None:
    """worker-b stops cleanly mid-job (it releases the lease); two new workers start at
    once on the store and exactly one of them takes the job over and completes it."""
    b = workers[1]
    job = start_job_past_a_checkpoint(b, "race-bot")
    b.stop(timeout_s=30)  # SIGTERM: the trainer stops, the lease is released
    lease = json.loads((home / "jobs" / job.job_id / "lease.1").read_text())
    assert lease["worker_id"] == "worker-b" and lease["released"]

    procs = [start(home, "worker-c"), start(home, "worker-d")]
    try:
        for proc in procs:
            proc.wait_healthy(timeout_s=300)
        ch_c, ft_c = stub(procs[0])
        with ch_c:
            events = watch_all(ft_c, job.job_id)
            got = ft_c.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    finally:
        for proc in procs:
            proc.stop()
    took = holders(events)
    assert len(took) == 2, took  # worker-b's claim, then exactly one takeover
    winner = re.fullmatch(
        rf"{LEASE_HOLDER_LOG} worker (worker-[cd]) took the job over from worker worker-b "
        rf"\(epoch 2\): worker worker-b released it",
        took[1],
    )
    assert winner, took
    assert states(events) == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
    assert got.state == finetune_pb2.SUCCEEDED and got.worker_id == winner.group(1)
    job_dir = home / "jobs" / job.job_id
    assert sorted(p.name for p in job_dir.glob("lease.*")) == ["lease.1", "lease.2"]
    steps = [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"]
    assert steps[-1] == 6 and steps.count(1) == 1

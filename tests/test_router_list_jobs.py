"""ListJobs through the router when two workers share one jobs folder: each worker lists
the same job, the client sees it once (the copy furthest along)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from common.pb import finetune_pb2, finetune_pb2_grpc
from tests.procs import Proc, start_router, start_worker
from tests.test_finetune import small_hp, small_jsonl, temp_home

FINETUNE = "llmcluster.v1.FineTune"


def _null_worker(home: Path, worker_id: str) -> Proc:
    # Null engine: no model weights to load, the real JobManager and FineTune servicer.
    return start_worker(
        "--engine", "null", "--worker-id", worker_id, "--self-test-interval-s", "0",
        env={"LLMCLUSTER_HOME": str(home)},
    )  # fmt: skip


def _wait_state(stub: finetune_pb2_grpc.FineTuneStub, job_id: str, state: int) -> None:
    deadline = time.monotonic() + 120
    while stub.GetJob(finetune_pb2.GetJobRequest(job_id=job_id), timeout=30).state != state:
        assert time.monotonic() < deadline, f"job {job_id} never reached {state}"
        time.sleep(0.2)


def test_list_jobs_through_the_router_is_unique_by_job_id(tmp_path: Path) -> None:
    home = temp_home(tmp_path)  # both workers: one LLMCLUSTER_HOME, so one jobs folder
    first = _null_worker(home, "shared-a")
    procs = [first]
    try:
        first.wait_healthy(120)
        with grpc.insecure_channel(first.address) as channel:
            ft = finetune_pb2_grpc.FineTuneStub(channel)
            job = ft.CreateJob(
                finetune_pb2.CreateJobRequest(
                    output_name="shared-job",
                    dataset_jsonl=small_jsonl(),
                    hyperparameters=small_hp(),
                ),
                timeout=60,
            )
            ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
            _wait_state(ft, job.job_id, finetune_pb2.CANCELLED)
        # The second worker reads the same folder at start: it lists the job too.
        second = _null_worker(home, "shared-b")
        procs.append(second)
        second.wait_healthy(120)
        with grpc.insecure_channel(second.address) as channel:
            listed = finetune_pb2_grpc.FineTuneStub(channel).ListJobs(
                finetune_pb2.ListJobsRequest(), timeout=10
            )
            assert [j.job_id for j in listed.jobs] == [job.job_id]

        router = start_router([first.address, second.address])
        procs.append(router)
        router.wait_healthy(60, service=FINETUNE)
        with grpc.insecure_channel(router.address) as channel:
            ft = finetune_pb2_grpc.FineTuneStub(channel)
            jobs = ft.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs
            assert [j.job_id for j in jobs] == [job.job_id]
            assert jobs[0].state == finetune_pb2.CANCELLED
            cancelled = ft.ListJobs(
                finetune_pb2.ListJobsRequest(state=finetune_pb2.CANCELLED), timeout=10
            ).jobs
            assert len(cancelled) == 1
            got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
            assert got.job_id == job.job_id
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_two_routers_agree_on_jobs_either_one_created(tmp_path: Path) -> None:
    """Issue 20: routers are interchangeable for FineTune. A job created through one router
    is found, watched and cancelled through the other (which never saw it: it searches the
    workers), and both list the same jobs. Two workers, each its own store."""
    procs: list[Proc] = []
    try:
        workers = [_null_worker(temp_home(tmp_path / wid), wid) for wid in ("solo-a", "solo-b")]
        procs += workers
        for w in workers:
            w.wait_healthy(120)
        routers = [start_router([w.address for w in workers]) for _ in range(2)]
        procs += routers
        for r in routers:
            r.wait_healthy(60, service=FINETUNE)
        channels = [grpc.insecure_channel(r.address) for r in routers]
        try:
            first, second = (finetune_pb2_grpc.FineTuneStub(c) for c in channels)
            job = first.CreateJob(
                finetune_pb2.CreateJobRequest(
                    output_name="two-routers",
                    dataset_jsonl=small_jsonl(),
                    hyperparameters=small_hp(),
                ),
                timeout=60,
            )
            got = second.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
            assert got.job_id == job.job_id
            events = second.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=60)
            first_event = next(events)
            assert first_event.job_id == job.job_id and first_event.sequence >= 1
            events.cancel()
            second.CancelJob(finetune_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
            _wait_state(first, job.job_id, finetune_pb2.CANCELLED)
            views = [
                sorted(
                    (j.job_id, j.state)
                    for j in s.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs
                )
                for s in (first, second)
            ]
            assert views[0] == views[1] == [(job.job_id, finetune_pb2.CANCELLED)]
            with pytest.raises(grpc.RpcError) as missing:
                second.GetJob(finetune_pb2.GetJobRequest(job_id="job-does-not-exist"), timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value
        finally:
            for c in channels:
                c.close()
    finally:
        for proc in reversed(procs):
            proc.stop()

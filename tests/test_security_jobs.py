"""Job ownership through a router with an auth file, over a real worker (default model):
a job belongs to the tenant that created it (recorded in its job.json); another tenant
gets NOT_FOUND from GetJob / WatchJob / CancelJob, does not see it in ListJobs, and
its client_token does not reach the owner's job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.auth import hash_token
from common.pb import finetune_pb2, finetune_pb2_grpc
from tests.procs import Proc, start_router, start_worker
from tests.test_finetune import small_hp, small_jsonl, temp_home

FINETUNE = "llmcluster.v1.FineTune"
TOKENS = {"team-a": "tok-a", "team-b": "tok-b"}


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    home = temp_home(tmp_path_factory.mktemp("owner-home"))
    auth = home / "auth.toml"
    auth.write_text(
        "".join(
            f'[[tenant]]\nname = "{name}"\nkey_sha256 = "{hash_token(token)}"\n'
            "allow_finetune = true\n\n"
            for name, token in TOKENS.items()
        )
    )
    jobs_dir = home / "jobs"
    worker = start_worker(
        "--dtype",
        "float32",
        "--jobs-dir",
        str(jobs_dir),
        "--self-test-interval-s",
        "0",
        env={"LLMCLUSTER_HOME": str(home)},
    )
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address], "--auth-file", str(auth))
        router.wait_healthy(timeout_s=60, service=FINETUNE)
        yield router, jobs_dir
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def test_another_tenants_job_is_not_found(cluster: tuple[Proc, Path]) -> None:
    router, jobs_dir = cluster
    with grpc.insecure_channel(router.address) as channel:
        stub = finetune_pb2_grpc.FineTuneStub(channel)
        request = finetune_pb2.CreateJobRequest(
            method=finetune_pb2.LORA,
            output_name="owned",
            dataset_jsonl=small_jsonl(),
            hyperparameters=small_hp(),
            client_token="same-token",
        )
        job = stub.CreateJob(request, timeout=120, metadata=bearer("team-a"))
        saved = json.loads((jobs_dir / job.job_id / "job.json").read_text())
        assert saved["owner"] == "team-a"

        for call in (
            lambda: stub.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), **as_b()),
            lambda: stub.CancelJob(finetune_pb2.CancelJobRequest(job_id=job.job_id), **as_b()),
            lambda: list(stub.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), **as_b())),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
            assert "team-a" not in err.value.details()
        listed_b = stub.ListJobs(finetune_pb2.ListJobsRequest(), **as_b())
        assert job.job_id not in [j.job_id for j in listed_b.jobs]
        listed_a = stub.ListJobs(
            finetune_pb2.ListJobsRequest(), timeout=30, metadata=bearer("team-a")
        )
        assert job.job_id in [j.job_id for j in listed_a.jobs]

        # team-b's retry with the same client_token makes its own job, not team-a's.
        other = stub.CreateJob(request, timeout=120, metadata=bearer("team-b"))
        assert other.job_id != job.job_id
        again = stub.CreateJob(request, timeout=120, metadata=bearer("team-a"))
        assert again.job_id == job.job_id  # idempotent within the tenant

        for tenant, job_id in (("team-a", job.job_id), ("team-b", other.job_id)):
            got = stub.GetJob(
                finetune_pb2.GetJobRequest(job_id=job_id), timeout=30, metadata=bearer(tenant)
            )
            assert got.job_id == job_id
            stub.CancelJob(
                finetune_pb2.CancelJobRequest(job_id=job_id), timeout=30, metadata=bearer(tenant)
            )
        # The owner survives in the persisted state the worker reloads.
        assert json.loads((jobs_dir / other.job_id / "job.json").read_text())["owner"] == "team-b"


def as_b() -> dict:
    return {"timeout": 30, "metadata": bearer("team-b")}

"""Issue 5's first bar end to end, through the router: a LoRA job on the shipped records
dataset halves the eval loss, and greedy answers served with the new adapter show the
trained format where the base model's do not. It trains SmolLM2-135M on CPU for 8 steps
(about a minute on a quiet 2-core machine), in the default run because it is the bar."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.procs import Proc, start_router, start_worker
from tests.test_finetune import temp_home

DATA = Path(__file__).resolve().parent / "data" / "finetune"
RECORD = re.compile(r"^ ?<<NAME: [A-Za-z]+ \| AGE: \d+ \| CITY: [A-Za-z ]+>>$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    home = temp_home(tmp_path_factory.mktemp("ft-serving-home"))
    worker = start_worker(
        "--dtype", "float32", "--self-test-interval-s", "0", env={"LLMCLUSTER_HOME": str(home)}
    )
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address])
        router.wait_healthy(timeout_s=60, service="llmcluster.v1.FineTune")
        yield router
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def _answer(stub, prompt: str, adapter: str = "") -> str:
    reply = stub.Generate(
        generate_pb2.GenerateRequest(
            prompt=prompt,
            adapter=adapter,
            params=generate_pb2.SamplingParams(max_new_tokens=24),
        ),
        timeout=120,
    )
    return reply.text


# Minutes of training on 2 cores: -m slow (test_router_finetune serves a new adapter
# through the router in the default run).
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_adapter_served_through_the_router_shows_the_format(cluster: Proc) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        jobs = finetune_pb2_grpc.FineTuneStub(channel)
        job = jobs.CreateJob(
            finetune_pb2.CreateJobRequest(
                method=finetune_pb2.LORA,
                output_name="records",
                dataset_jsonl=(DATA / "records.jsonl").read_text(),
                hyperparameters=finetune_pb2.Hyperparameters(
                    epochs=1,
                    max_steps=8,
                    batch_size=8,
                    learning_rate=1e-3,
                    warmup_ratio=0.1,
                    max_seq_length=64,
                    eval_fraction=0.05,
                    seed=0,
                ),
            ),
            timeout=60,
        )
        for _ in jobs.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=1500):
            pass
        job = jobs.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
        assert job.state == finetune_pb2.SUCCEEDED, job.error
        assert job.eval_after.eval_loss <= 0.5 * job.eval_before.eval_loss
        ref = job.artifact.ref

        stub = generate_pb2_grpc.GenerateStub(channel)
        heldout = [
            json.loads(line)
            for line in (DATA / "records_heldout.jsonl").read_text().splitlines()[:5]
        ]
        base = [_answer(stub, row["prompt"]) for row in heldout]
        tuned = [_answer(stub, row["prompt"], adapter=ref) for row in heldout]
    assert not any("<<NAME:" in a for a in base), base
    assert all(RECORD.match(a) for a in tuned), tuned

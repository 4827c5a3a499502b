"""FineTune on a real worker process: validation, the whole story of a LoRA job through
WatchJob, serving the new adapter on the same worker, idempotency, cancel, NOT_FOUND, the
CLI, and (slow) a worker SIGKILLed mid-job that resumes the job after a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import safetensors.torch
import torch

from common.model_store import ModelStore
from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.conftest import new_home
from tests.procs import REPO_ROOT, Proc, start_worker
from worker.jobs import JobManager, JobsConfig

RECORDS = REPO_ROOT / "tests" / "data" / "finetune" / "records.jsonl"


def temp_home(tmp: Path) -> Path:
    """A fresh LLMCLUSTER_HOME sharing the run's converted default model (conftest)."""
    return new_home(tmp)


def small_jsonl(n: int = 24) -> str:
    return "\n".join(RECORDS.read_text().splitlines()[:n]) + "\n"


def small_hp(**overrides: int | float) -> finetune_pb2.Hyperparameters:
    # Tiny on purpose: a few steps of short sequences keep the job under a minute on CPU.
    values = {
        "max_steps": 3,
        "batch_size": 4,
        "max_seq_length": 48,
        "eval_fraction": 0.2,
        "checkpoint_every_steps": 1,
        **overrides,
    }
    return finetune_pb2.Hyperparameters(**values)  # type: ignore[arg-type]


def start(home: Path, *extra: str, port: int | None = None) -> Proc:
    proc = start_worker(
        "--dtype",
        "float32",
        "--worker-id",
        "ft-worker",
        "--max-running",
        "8",
        *extra,
        port=port,
        env={"LLMCLUSTER_HOME": str(home)},
    )
    try:
        proc.wait_healthy(timeout_s=300)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return temp_home(tmp_path_factory.mktemp("ft-home"))


@pytest.fixture(scope="module")
def worker(home: Path):
    proc = start(home)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def channel(worker: Proc):
    with grpc.insecure_channel(worker.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def ft(channel: grpc.Channel) -> finetune_pb2_grpc.FineTuneStub:
    return finetune_pb2_grpc.FineTuneStub(channel)


def watch_all(
    ft: finetune_pb2_grpc.FineTuneStub, job_id: str, timeout_s: float = 300.0
) -> list[finetune_pb2.JobEvent]:
    return list(ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job_id), timeout=timeout_s))


def states(events: list[finetune_pb2.JobEvent]) -> list[str]:
    return [
        finetune_pb2.JobState.Name(e.state_change.state)
        for e in events
        if e.WhichOneof("event") == "state_change"
    ]


def kinds(events: list[finetune_pb2.JobEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


# ------------------------------------------------------------------ validation


BAD_REQUESTS = [
    (
        "malformed JSONL",
        dict(dataset_jsonl='{"prompt": "a", "completion": "b"}\n{"prompt": "oops"\n'),
        "line 2",
    ),
    (
        "wrong field type",
        dict(
            dataset_jsonl='{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "x"}\n'
        ),
        "line 2",
    ),
    ("empty dataset", dict(dataset_jsonl=""), "dataset"),
    ("only blank rows", dict(dataset_jsonl='{"text": "  "}\n{"text": ""}\n'), "empty"),
    (
        "a row without its completion",
        dict(dataset_jsonl=small_jsonl(4) + '\n{"prompt": "c"}\n'),
        "line 6: field 'completion' is missing",
    ),
    (
        "one example",
        dict(dataset_jsonl='{"prompt": "a", "completion": " b"}\n'),
        "1 training example(s); at least 2 are needed",
    ),
    (
        "one example left after dropping the invalid",
        dict(
            dataset_jsonl='{"prompt": "a", "completion": " b"}\n{"prompt": "c"}\n',
            hyperparameters=finetune_pb2.Hyperparameters(drop_invalid=True),
        ),
        "dropped 1: 1 with nothing to learn",
    ),
    ("unknown base model", dict(base_model="no-such-model"), "base_model"),
    ("r = 0", dict(hyperparameters=finetune_pb2.Hyperparameters(lora_r=0)), "lora_r"),
    (
        "lr = 0",
        dict(hyperparameters=finetune_pb2.Hyperparameters(learning_rate=0.0)),
        "learning_rate",
    ),
    (
        "lr < 0",
        dict(hyperparameters=finetune_pb2.Hyperparameters(learning_rate=-1e-4)),
        "learning_rate",
    ),
    ("path traversal name", dict(output_name="../x"), "output_name"),
    ("nproc out of range", dict(nproc=1000), "nproc must be in [1, 64], got 1000"),
    (
        "nproc beyond the worker's cores",
        dict(nproc=64, hyperparameters=finetune_pb2.Hyperparameters(batch_size=64)),
        "nproc 64 is more than the",
    ),
    (
        "nproc not dividing the batch",
        dict(nproc=2, hyperparameters=finetune_pb2.Hyperparameters(batch_size=3)),
        "nproc 2 must divide hyperparameters.batch_size 3",
    ),
    ("unknown dataset name", dict(dataset_jsonl="", dataset_name="nope"), "dataset_name"),
    (
        "a bad eval dataset line",
        dict(eval_dataset_jsonl='{"prompt": "a", "completion": " b"}\n{"prompt": "c"}\n'),
        "eval dataset line 2: field 'completion' is missing",
    ),
    (
        "two eval datasets",
        dict(eval_dataset_jsonl='{"text": "a"}\n', eval_dataset_name="held-out"),
        "eval dataset: set exactly one of eval_dataset_jsonl, eval_dataset_name",
    ),
    (
        "unknown eval dataset name",
        dict(eval_dataset_name="nope"),
        "eval_dataset_name: no dataset 'nope'",
    ),
]


def test_bad_requests_are_invalid_argument_and_write_nothing(ft, home: Path) -> None:
    for label, fields, needle in BAD_REQUESTS:
        request = finetune_pb2.CreateJobRequest(output_name="bad-job", dataset_jsonl=small_jsonl(4))
        for key, value in fields.items():
            if key == "hyperparameters":
                request.hyperparameters.CopyFrom(value)
            else:
                setattr(request, key, value)
        with pytest.raises(grpc.RpcError) as info:
            ft.CreateJob(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert needle in info.value.details(), (label, info.value.details())
    assert not (home / "store" / "bad-job").exists()
    assert not (home / "store" / "x").exists()
    assert not (home / "x").exists()
    assert ft.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs == []


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


# ------------------------------------------------------------------ a whole job


@pytest.fixture(scope="module")
def finished_job(ft) -> tuple[finetune_pb2.Job, list[finetune_pb2.JobEvent]]:
    job = ft.CreateJob(
        finetune_pb2.CreateJobRequest(
            output_name="records-bot", dataset_jsonl=small_jsonl(), hyperparameters=small_hp()
        ),
        timeout=60,
    )
    assert job.state == finetune_pb2.QUEUED  # returns at once, before training starts
    return job, watch_all(ft, job.job_id)


def test_watch_tells_the_whole_story(ft, finished_job, home: Path) -> None:
    job, events = finished_job
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
    k = kinds(events)
    evals = [e.evaluation for e in events if e.WhichOneof("event") == "evaluation"]
    assert [e.stage for e in evals] == ["before", "after"]
    metrics = [e.metrics for e in events if e.WhichOneof("event") == "metrics"]
    assert [m.step for m in metrics] == [1, 2, 3]
    assert all(m.total_steps == 3 and m.loss > 0 and m.tokens_per_second > 0 for m in metrics)
    assert "checkpoint" in k
    # Order: before-eval, training, after-eval, artifact, then the terminal state.
    assert k.index("evaluation") < k.index("metrics") < k.index("artifact") < len(k) - 1
    artifact = next(e.artifact for e in events if e.WhichOneof("event") == "artifact")
    assert artifact.ref == "records-bot@1" and len(artifact.sha256) == 64

    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert got.state == finetune_pb2.SUCCEEDED
    assert got.worker_id == "ft-worker"
    assert got.artifact.ref == "records-bot@1"
    assert got.eval_before.eval_loss > 0 and got.eval_after.eval_loss > 0
    assert got.hyperparameters.lora_r == 16 and got.hyperparameters.max_steps == 3
    assert got.train_examples + got.eval_examples == 24

    meta = json.loads((home / "store" / "records-bot" / "1" / "metadata.json").read_text())
    assert meta["job_id"] == job.job_id
    assert meta["base_model"] == got.base_model and meta["method"] == "lora"
    assert meta["hyperparameters"]["max_steps"] == 3
    assert "eval_loss_before" in meta["metrics"] and "eval_loss_after" in meta["metrics"]
    assert meta["trace_id"] == got.trace_id and len(got.trace_id) == 32

    # Replay from a sequence number gives the tail only.
    tail = list(
        ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id, from_sequence=3), timeout=30)
    )
    assert [e.sequence for e in tail] == [e.sequence for e in events[2:]]


def test_new_adapter_is_served_on_the_same_worker(channel, finished_job) -> None:
    gen = generate_pb2_grpc.GenerateStub(channel)
    params = generate_pb2.SamplingParams(max_new_tokens=12, temperature=0.0)
    prompt = "Text: Kofi (45) works in Lagos.\nRecord:"
    reply = gen.Generate(
        generate_pb2.GenerateRequest(prompt=prompt, adapter="records-bot@1", params=params),
        timeout=120,
    )
    assert reply.usage.completion_tokens > 0
    listed = gen.ListModels(generate_pb2.ListModelsRequest(), timeout=10)
    assert any(
        m.name == "records-bot" and m.version == "1" and m.method == "lora" for m in listed.models
    )


def _greedy(gen, prompt: str, adapter: str = "") -> list[int]:
    reply = gen.Generate(
        generate_pb2.GenerateRequest(
            prompt=prompt,
            adapter=adapter,
            params=generate_pb2.SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=1),
        ),
        timeout=120,
    )
    assert reply.usage.adapter == adapter
    return [t.id for t in reply.tokens]


def test_list_models_shows_only_what_the_worker_can_serve(
    channel, ft, finished_job, home: Path, tmp_path: Path
) -> None:
    """A prompt-tuning job's artifact is advertised with its method and answers per
    request, in one batch with base and LoRA requests, each token-identical to running
    alone; a prompt-tuning artifact of another width and a full fine-tune are not
    advertised, and asking for the first is INVALID_ARGUMENT saying why."""
    job = ft.CreateJob(
        finetune_pb2.CreateJobRequest(
            method=finetune_pb2.PROMPT_TUNING,
            output_name="soft-bot",
            dataset_jsonl=small_jsonl(),
            hyperparameters=small_hp(num_virtual_tokens=4),
        ),
        timeout=60,
    )
    assert states(watch_all(ft, job.job_id))[-1] == "SUCCEEDED"
    store = ModelStore(home / "store")
    src = tmp_path / "narrow-tokens"
    src.mkdir()
    safetensors.torch.save_file(
        {"prompt_embeddings": torch.zeros(4, 8)}, str(src / "adapter_model.safetensors")
    )
    store.publish(
        "narrow-bot", src, {"base_model": "SmolLM2-135M-Instruct", "method": "prompt_tuning"}
    )
    full = tmp_path / "full-model"
    full.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(full / "model.safetensors"))
    store.publish("full-bot", full, {"base_model": "SmolLM2-135M-Instruct", "method": "full"})

    gen = generate_pb2_grpc.GenerateStub(channel)
    listed = {
        m.name: m for m in gen.ListModels(generate_pb2.ListModelsRequest(), timeout=10).models
    }
    assert listed["soft-bot"].method == "prompt_tuning" and listed["soft-bot"].version == "1"
    assert listed["records-bot"].method == "lora"
    assert "narrow-bot" not in listed and "full-bot" not in listed

    prompt = "Text: Kofi (45) works in Lagos.\nRecord:"
    adapters = ["", "records-bot@1", "soft-bot@1"]
    alone = [_greedy(gen, prompt, a) for a in adapters]
    assert alone[2] != alone[0]  # the virtual tokens change the answer
    with ThreadPoolExecutor(len(adapters) * 2) as pool:
        together = list(pool.map(lambda a: _greedy(gen, prompt, a), adapters * 2))
    assert together == alone * 2

    with pytest.raises(grpc.RpcError) as err:
        gen.Generate(generate_pb2.GenerateRequest(prompt="Hi", adapter="narrow-bot@1"), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8-wide" in (err.value.details() or "")


def test_list_jobs_and_cli(worker: Proc, ft, finished_job) -> None:
    job, _ = finished_job
    jobs = ft.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs
    assert job.job_id in [j.job_id for j in jobs]
    only = ft.ListJobs(finetune_pb2.ListJobsRequest(state=finetune_pb2.FAILED), timeout=10).jobs
    assert job.job_id not in [j.job_id for j in only]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmcluster", "finetune", *args, "--target", worker.address],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = cli("list")
    assert out.returncode == 0 and job.job_id in out.stdout and "SUCCEEDED" in out.stdout
    out = cli("watch", job.job_id)
    assert out.returncode == 0, out.stderr
    assert "eval before" in out.stdout and "eval after" in out.stdout
    assert "done: records-bot@1" in out.stdout
    assert "done in" in out.stdout, "the progress bar's ETA ends as the time it took"
    out = cli("get", job.job_id)
    assert out.returncode == 0, out.stderr
    for label in ("hyperparameters", "metrics", "eval after", "events", "states"):
        assert label in out.stdout, out.stdout
    assert re.search(r"^artifact +records-bot@1  sha256 [0-9a-f]{64}$", out.stdout, re.M)
    out = cli("get", "ft-nope")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


# ------------------------------------------------------------------ token, queue, cancel


def test_client_token_queue_and_cancel(ft, finished_job) -> None:
    def create(token: str, name: str) -> finetune_pb2.Job:
        return ft.CreateJob(
            finetune_pb2.CreateJobRequest(
                output_name=name,
                dataset_jsonl=small_jsonl(),
                hyperparameters=small_hp(max_steps=200, checkpoint_every_steps=0),
                client_token=token,
            ),
            timeout=60,
        )

    first = create("token-a", "long-job")
    again = create("token-a", "long-job")
    assert again.job_id == first.job_id
    queued = create("token-b", "queued-job")
    assert queued.job_id != first.job_id
    # One training slot (max_concurrent_jobs=1): the second job waits.
    assert ft.GetJob(finetune_pb2.GetJobRequest(job_id=queued.job_id)).state == finetune_pb2.QUEUED
    cancelled = ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=queued.job_id), timeout=10)
    assert cancelled.state == finetune_pb2.CANCELLED
    assert states(watch_all(ft, queued.job_id, 30)) == ["QUEUED", "CANCELLED"]

    # Cancel the running one once it has made a step: it stops within a step.
    stream = ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=first.job_id), timeout=300)
    seen: list[finetune_pb2.JobEvent] = []
    for event in stream:
        seen.append(event)
        if event.WhichOneof("event") == "metrics":
            ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=first.job_id), timeout=10)
            break
    seen.extend(stream)
    after_cancel = [e for e in seen if e.WhichOneof("event") == "metrics"]
    assert states(seen) == ["QUEUED", "RUNNING", "CANCELLED"]
    assert len(after_cancel) <= 3  # the step that was running, maybe one more
    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=first.job_id))
    assert got.state == finetune_pb2.CANCELLED and got.finished_unix_ms > 0
    # Same token after the end: still the same job, not a new one.
    assert create("token-a", "long-job").job_id == first.job_id


# ------------------------------------------------------------------ ranks


def test_two_rank_job_through_the_worker(ft, finished_job, home: Path) -> None:
    """nproc 2 on the worker: one job, two ranks, one event stream, the same story."""
    job = ft.CreateJob(
        finetune_pb2.CreateJobRequest(
            output_name="records-bot-2r",
            dataset_jsonl=small_jsonl(),
            hyperparameters=small_hp(),
            nproc=2,
        ),
        timeout=60,
    )
    events = watch_all(ft, job.job_id)
    log = (home / "jobs" / job.job_id / "process.log").read_text()
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"], log
    assert [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"] == [1, 2, 3]
    assert [e.evaluation.stage for e in events if e.WhichOneof("event") == "evaluation"] == [
        "before",
        "after",
    ]
    assert "started 2 ranks" in log and "rank 1/2 joined (gloo on cpu)" in log
    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert got.artifact.ref == "records-bot-2r@1"


# ------------------------------------------------------------------ dataset report


def test_dataset_report_and_eval_dataset_through_the_service(worker: Proc, ft, home: Path) -> None:
    records = RECORDS.read_text().splitlines()
    train = "\n".join([*records[:12], records[0], '{"prompt": "Text: -", "completion": ""}'])
    held_out = "\n".join([records[3], *records[12:16]])  # records[3] leaks from training
    request = finetune_pb2.CreateJobRequest(
        output_name="report-bot",
        dataset_jsonl=train + "\n",
        eval_dataset_jsonl=held_out + "\n",
        hyperparameters=small_hp(max_steps=1, drop_invalid=True, eval_fraction=0.5),
    )
    job = ft.CreateJob(request, timeout=60)
    report = job.dataset_report
    assert (report.rows, report.eval_rows, report.train, report.eval) == (14, 5, 12, 4)
    assert (report.duplicates, report.empty, report.eval_leaked) == (1, 1, 1)
    assert report.dropped_reasons == [
        "line 14: field 'completion' is empty: the prompt has nothing to learn",
        "eval dataset line 1: also in the training set (leakage)",
    ]
    assert (job.train_examples, job.eval_examples) == (12, 4)
    assert (
        0 < report.learned_tokens.min <= report.learned_tokens.median <= report.learned_tokens.max
    )
    assert report.total_tokens.max <= 48 and report.total_tokens.p95 >= report.total_tokens.median
    assert report.completion_examples == 12 and report.distinct_completions == 12
    assert not report.top_classes  # every record is its own completion

    events = watch_all(ft, job.job_id)
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"], events[-1]
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    kept = "kept 16 of 19 rows (14 training + 5 eval dataset rows; 12 train, 4 eval)"
    assert any(line.startswith(f"dataset validated: {kept}") for line in logs), logs
    # The training process read the same two files to the same report.
    assert any(line.startswith(f"data: {kept}") for line in logs), logs
    assert any(line.startswith("data: training set balance: learned tokens min") for line in logs)
    assert any(e.WhichOneof("event") == "evaluation" for e in events)

    got = ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
    assert got.dataset_report == report
    listed = ft.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10).jobs
    assert next(j for j in listed if j.job_id == job.job_id).dataset_report == report
    # What a restarted worker reads back: the job's folder on disk.
    assert (home / "jobs" / job.job_id / "eval.jsonl").read_text() == held_out + "\n"
    manager = JobManager(JobsConfig(jobs_dir=home / "jobs", store_dir="", data_dir=home / "data"))
    assert manager.to_pb(manager.get(job.job_id)).dataset_report == report

    out = subprocess.run(
        [sys.executable, "-m", "llmcluster", "finetune", "get", job.job_id]
        + ["--target", worker.address],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"^dataset +14 rows read \+ 5 eval dataset rows; kept 12 train / 4 eval$", out.stdout, re.M
    ), out.stdout
    assert re.search(
        r"^dropped +1 empty, 0 invalid, 0 too short, 1 duplicates, 1 eval", out.stdout, re.M
    )
    assert re.search(
        r"^dropped row +eval dataset line 1: also in the training set", out.stdout, re.M
    )
    assert re.search(
        r"^learned tokens +min \d+ / median \d+ / p95 \d+ / max \d+$", out.stdout, re.M
    )
    assert re.search(r"^completions +12 distinct in 12$", out.stdout, re.M)


# ------------------------------------------------------------------ crash recovery


@pytest.mark.slow
def test_sigkill_mid_job_resumes_after_restart(tmp_path: Path) -> None:
    home = temp_home(tmp_path)
    proc = start(home)
    port = proc.port
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = finetune_pb2_grpc.FineTuneStub(ch)
            job = stub.CreateJob(
                finetune_pb2.CreateJobRequest(
                    output_name="crash-bot",
                    dataset_jsonl=small_jsonl(),
                    hyperparameters=small_hp(max_steps=5),
                    client_token="crash-token",
                ),
                timeout=60,
            )
            for event in stub.WatchJob(
                finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=300
            ):
                if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step >= 2:
                    break
        proc.signal(signal.SIGKILL)  # the worker's group; the trainer has its own session
        proc.popen.wait(10)
    finally:
        proc.stop()
    time.sleep(1.0)  # the orphaned trainer notices its parent is gone within 0.5 s
    trainer_pids = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and job.job_id.encode() in _cmdline(p)
    ]
    assert trainer_pids == []

    proc = start(home, port=port)
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = finetune_pb2_grpc.FineTuneStub(ch)
            # Idempotency survives the restart.
            again = stub.CreateJob(
                finetune_pb2.CreateJobRequest(
                    output_name="crash-bot",
                    dataset_jsonl=small_jsonl(),
                    client_token="crash-token",
                ),
                timeout=60,
            )
            assert again.job_id == job.job_id
            events = watch_all(stub, job.job_id)
    finally:
        proc.stop()
    assert states(events) == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    assert any("resuming from checkpoint at step" in line for line in logs), logs
    assert any("resumed from" in line for line in logs), logs  # the trainer's own notice
    steps = [e.metrics.step for e in events if e.WhichOneof("event") == "metrics"]
    assert steps[-1] == 5 and steps.count(1) == 1  # resumed, not restarted from step 1
    assert (home / "store" / "crash-bot" / "1" / "metadata.json").exists()


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes() if os.path.exists(p / "cmdline") else b""
    except OSError:
        return b""

"""Jobs that span processes (trainer/distributed.py): a real job process with nproc 2
launches two gloo ranks that follow the loss curve of one process at the same global
batch, resume from their checkpoint to the uninterrupted run's steps, and all stop on
cancel and on a lost lease; only rank 0 writes. Also torchrun running ``-m trainer``
(the documented multi-machine path) and the launcher's exit-code rules."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format
from safetensors.torch import load_file

from common import job_lease
from common.pb import finetune_pb2
from tests.procs import REPO_ROOT
from tests.trainer_fixtures import (  # noqa: F401  (fixtures)
    real_model_fixture,
    small_rows,
    tiny_model_fixture,
    write_jsonl,
)
from trainer.config import TrainConfig
from trainer.distributed import launch
from trainer.job_process import EXIT_CANCELLED, EXIT_LEASE_LOST

# Measured: per-step losses of 1 and 2 ranks differ by < 1e-6 relative (float32 sums
# in another order); the tolerance leaves room for other CPUs and longer runs.
LOSS_RTOL = 1e-4


def write_job(
    job_dir: Path,
    model: str,
    config: TrainConfig,
    nproc: int,
    rows: list | None = None,
    resume_from: Path | None = None,
) -> Path:
    job_dir.mkdir(parents=True)
    write_jsonl(job_dir / "data.jsonl", rows or small_rows(24))
    run = {
        "config": config.to_dict(),
        "model": model,
        "device": "cpu",
        "threads": 2,
        "nproc": nproc,
        "store_dir": str(job_dir.parent / "store"),
        "output_name": job_dir.name,
    }
    if resume_from is not None:
        run["resume_from"] = str(resume_from)
    (job_dir / "job.json").write_text(json.dumps({"job": {"job_id": job_dir.name}, "run": run}))
    return job_dir


def start_job(job_dir: Path, lease_epoch: int = 0) -> subprocess.Popen[bytes]:
    log = open(job_dir / "process.log", "wb")  # noqa: SIM115 - the child owns it now
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.job_process", "--job-dir", str(job_dir)]
            + ["--lease-epoch", str(lease_epoch)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LLMCLUSTER_HOME": str(job_dir.parent / "home")},
            start_new_session=True,  # as the worker starts it: ranks share its group
        )
    finally:
        log.close()


def finish(proc: subprocess.Popen[bytes], job_dir: Path, timeout_s: float = 240) -> int:
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode is not None


def events(job_dir: Path) -> list[finetune_pb2.JobEvent]:
    path = job_dir / "progress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json_format.Parse(line, finetune_pb2.JobEvent()) for line in lines]


def of_kind(evs: list[finetune_pb2.JobEvent], kind: str) -> list:
    return [getattr(e, kind) for e in evs if e.WhichOneof("event") == kind]


def run_job(job_dir: Path) -> list[finetune_pb2.JobEvent]:
    code = finish(start_job(job_dir), job_dir)
    log = (job_dir / "process.log").read_text()
    assert code == 0, log
    evs = events(job_dir)
    assert [finetune_pb2.JobState.Name(s.state) for s in of_kind(evs, "state_change")] == [
        "SUCCEEDED"
    ], log
    return evs


def losses(evs: list[finetune_pb2.JobEvent]) -> list[float]:
    return [m.loss for m in of_kind(evs, "metrics")]


def rank_pids(job_dir: Path) -> list[int]:
    found = re.search(r"started \d+ ranks \(pids ([\d, ]+),", (job_dir / "process.log").read_text())
    assert found, (job_dir / "process.log").read_text()
    return [int(p) for p in found.group(1).split(", ")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_two_ranks_follow_one_rank_loss_curve(tiny_model, tmp_path: Path) -> None:
    """19 training examples in micro-batches of 4: the last micro-batch of each epoch
    (3 examples) splits unevenly, 2 and 1; the curve and the adapter still match."""
    config = TrainConfig(
        method="lora",
        epochs=2,
        learning_rate=5e-3,
        lora_dropout=0.0,
        batch_size=4,
        max_seq_length=32,
        eval_fraction=0.2,
    )
    one = run_job(write_job(tmp_path / "one", tiny_model.path, config, nproc=1))
    two = run_job(write_job(tmp_path / "two", tiny_model.path, config, nproc=2))

    assert len(losses(one)) == 10
    assert [m.step for m in of_kind(two, "metrics")] == list(range(1, 11))  # one writer
    assert losses(two) == pytest.approx(losses(one), rel=LOSS_RTOL)
    assert losses(two)[-1] < losses(two)[0]
    evals_one, evals_two = of_kind(one, "evaluation"), of_kind(two, "evaluation")
    assert [e.stage for e in evals_two] == ["before", "after"]
    assert [e.eval_loss for e in evals_two] == pytest.approx(
        [e.eval_loss for e in evals_one], rel=LOSS_RTOL
    )
    assert [c.step for c in of_kind(two, "checkpoint")] == [5]
    a = load_file(str(tmp_path / "one" / "work" / "artifact" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "work" / "artifact" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    assert of_kind(two, "artifact")[0].ref == "two@1"
    assert "started 2 ranks" in (tmp_path / "two" / "process.log").read_text()
    assert "data-parallel on 2 ranks: 2 examples per rank per micro-batch" in of_kind(two, "log")
    assert not any("data-parallel" in line for line in of_kind(one, "log"))


def test_two_ranks_resume_to_the_uninterrupted_run(tiny_model, tmp_path: Path) -> None:
    """With dropout on, each rank draws its own masks: the checkpoint keeps every rank's
    generator, so a resumed run repeats the uninterrupted run's steps exactly."""
    config = TrainConfig(
        method="lora",
        max_steps=4,
        learning_rate=5e-3,
        lora_dropout=0.2,
        batch_size=4,
        max_seq_length=32,
        eval_fraction=0.0,
        checkpoint_every_steps=2,
    )
    whole = run_job(write_job(tmp_path / "whole", tiny_model.path, config, nproc=2))
    checkpoint = Path(of_kind(whole, "checkpoint")[0].path)
    assert checkpoint.name == "step-0000002"
    rng = load_file(str(checkpoint / "rng.safetensors"))
    assert "cpu" in rng and "rank1.cpu" in rng and not torch.equal(rng["cpu"], rng["rank1.cpu"])

    resumed = run_job(
        write_job(tmp_path / "resumed", tiny_model.path, config, nproc=2, resume_from=checkpoint)
    )
    assert [m.step for m in of_kind(resumed, "metrics")] == [3, 4]
    assert losses(resumed) == pytest.approx(losses(whole)[2:], rel=1e-6)


def test_cancel_stops_every_rank(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(
        method="lora", max_steps=5000, batch_size=2, max_seq_length=32, eval_fraction=0.0
    )
    job_dir = write_job(tmp_path / "cancelled", tiny_model.path, config, nproc=2)
    proc = start_job(job_dir)
    try:
        deadline = time.monotonic() + 120
        while not of_kind(events(job_dir), "metrics"):
            assert proc.poll() is None, (job_dir / "process.log").read_text()
            assert time.monotonic() < deadline, "no training step in 120 s"
            time.sleep(0.1)
        pids = rank_pids(job_dir)
        (job_dir / "cancel").touch()
        assert finish(proc, job_dir, 60) == EXIT_CANCELLED, (job_dir / "process.log").read_text()
    finally:
        finish(proc, job_dir, 0.1) if proc.poll() is None else None
    states = of_kind(events(job_dir), "state_change")
    assert [finetune_pb2.JobState.Name(s.state) for s in states] == ["CANCELLED"]
    assert re.fullmatch(r"cancelled after step \d+", states[0].message)
    assert not any(alive(pid) for pid in pids)
    assert not (job_dir / "work" / "artifact").exists()


def test_a_lost_lease_stops_every_rank_and_nothing_more_is_written(
    tiny_model, tmp_path: Path
) -> None:
    config = TrainConfig(
        method="lora",
        max_steps=5000,
        batch_size=2,
        max_seq_length=32,
        eval_fraction=0.0,
        checkpoint_every_steps=1,
    )
    job_dir = write_job(tmp_path / "fenced", tiny_model.path, config, nproc=2)
    assert job_lease.try_claim(job_dir, 1, "a", "a1", 30.0) is not None
    proc = start_job(job_dir, lease_epoch=1)
    try:
        deadline = time.monotonic() + 120
        while not of_kind(events(job_dir), "checkpoint"):
            assert proc.poll() is None, (job_dir / "process.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.1)
        pids = rank_pids(job_dir)
        assert job_lease.try_claim(job_dir, 2, "b", "b1", 30.0) is not None
        claimed_at = (job_dir / "progress.jsonl").stat().st_size
        assert finish(proc, job_dir, 60) == EXIT_LEASE_LOST, (job_dir / "process.log").read_text()
    finally:
        finish(proc, job_dir, 0.1) if proc.poll() is None else None
    text = (job_dir / "progress.jsonl").read_text()
    assert text[claimed_at:].count("\n") <= 1, text[claimed_at:]  # the line being written
    assert "stateChange" not in text  # the new holder reports
    assert not (job_dir / "work" / "artifact").exists()
    assert not any(alive(pid) for pid in pids)


@pytest.mark.slow  # ~70 s on 2 busy cores: four processes load the default model
def test_two_ranks_on_the_default_model(real_model, tmp_path: Path) -> None:
    """The real default model: three optimizer steps of a global batch of 4 on 1 and on
    2 ranks give the same losses (measured: within 7e-7 relative)."""
    config = TrainConfig(
        method="lora",
        max_steps=3,
        learning_rate=2e-4,
        lora_dropout=0.0,
        batch_size=4,
        max_seq_length=48,
        eval_fraction=0.0,
    )
    one = run_job(write_job(tmp_path / "one", real_model.path, config, nproc=1))
    two = run_job(write_job(tmp_path / "two", real_model.path, config, nproc=2))
    print("default model losses, 1 rank:", losses(one), "2 ranks:", losses(two))
    assert len(losses(two)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=LOSS_RTOL)


def test_torchrun_runs_the_local_trainer_and_rank0_publishes(tiny_model, tmp_path: Path) -> None:
    """The documented path beyond one worker: torchrun's launcher (here one node) runs
    ``-m trainer``; every rank trains, one reports and one version is published."""
    data = write_jsonl(tmp_path / "train.jsonl", small_rows(24))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        + ["-m", "trainer", "--data", str(data), "--model", tiny_model.path]
        + ["--device", "cpu", "--max-steps", "3", "--batch-size", "4", "--max-seq-length", "32"]
        + ["--name", "tr", "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "w")],
        cwd=REPO_ROOT,
        env={**os.environ, "LLMCLUSTER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("step 3/3 ") == 1, out.stdout
    assert "published tr@1 " in out.stdout
    assert sorted(p.name for p in (tmp_path / "store" / "tr").iterdir() if p.is_dir()) == ["1"]


# A rank that records torchrun's variables, then exits per its rank (no torch: fast).
RANK_SCRIPT = """
import json, os, sys, time
env = {k: os.environ.get(k) for k in (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
out = sys.argv[1]
with open(os.path.join(out, "rank%s.json" % env["RANK"]), "w") as fh:
    json.dump({**env, "pid": os.getpid()}, fh)
codes = json.loads(sys.argv[2])  # rank -> (sleep_s, exit code)
sleep_s, code = codes[env["RANK"]]
time.sleep(sleep_s)
sys.exit(code)
"""


def launch_script(tmp_path: Path, codes: dict[str, list[float]], **kw) -> tuple[int, list]:
    failures: list[str] = []
    code = launch(
        ["-c", RANK_SCRIPT, str(tmp_path), json.dumps(codes)],
        len(codes),
        threads=4,
        on_failure=failures.append,
        poll_s=0.05,
        **kw,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(codes))]
    return code, [failures, ranks]


def test_launcher_sets_torchrun_env_and_returns_rank0s_code(tmp_path: Path) -> None:
    code, (failures, ranks) = launch_script(
        tmp_path, {"0": [0.2, EXIT_LEASE_LOST], "1": [60, 0]}, grace_s=0.5
    )
    assert code == EXIT_LEASE_LOST and failures == []
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert len({r["MASTER_PORT"] for r in ranks}) == 1
    assert {r["OMP_NUM_THREADS"] for r in ranks} == {"2"}  # 4 threads shared by 2 ranks
    assert not alive(ranks[1]["pid"])  # killed once rank 0 was gone


def test_launcher_ends_the_job_when_another_rank_fails(tmp_path: Path) -> None:
    started = time.monotonic()
    code, (failures, ranks) = launch_script(
        tmp_path, {"0": [60, 0], "1": [0.0, 7], "2": [60, 0]}, grace_s=0.5
    )
    assert code == 1
    assert failures == ["rank 1 of 3 exited with code 7"]
    assert time.monotonic() - started < 30
    assert not any(alive(r["pid"]) for r in ranks)

"""Job leases (common/job_lease.py): the atomic claim under threads and processes,
renewal, expiry on the observer's clock, a stolen lease, and a training process fenced
by its epoch."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import job_lease
from common.pb import finetune_pb2
from tests.procs import REPO_ROOT
from tests.trainer_fixtures import small_rows, tiny_model_fixture, write_jsonl  # noqa: F401
from trainer.config import TrainConfig
from trainer.job_process import EXIT_LEASE_LOST, ProgressWriter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_claim_race_between_threads_has_one_winner(tmp_path: Path) -> None:
    start = threading.Barrier(16)
    won: list[str] = []

    def claim(i: int) -> None:
        start.wait()
        if job_lease.try_claim(tmp_path, 1, f"w{i}", f"inc{i}", 5.0) is not None:
            won.append(f"w{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    lease = job_lease.read_current(tmp_path)
    assert lease is not None and lease.epoch == 1 and lease.worker_id == won[0]
    # No temp file is left behind by winners or losers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lease.1"]


def _claim_in_process(job_dir: str, worker: str, at: float, out: multiprocessing.Queue) -> None:
    time.sleep(max(0.0, at - time.time()))
    lease = job_lease.try_claim(Path(job_dir), 2, worker, worker, 5.0)
    out.put((worker, lease is not None))


def test_claim_race_between_processes_has_one_winner(tmp_path: Path) -> None:
    assert job_lease.try_claim(tmp_path, 1, "old", "old", 5.0) is not None
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    at = time.time() + 0.5  # every process claims at the same moment
    procs = [
        ctx.Process(target=_claim_in_process, args=(str(tmp_path), f"p{i}", at, out))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    winners = [w for w, won in results if won]
    assert len(winners) == 1, results
    lease = job_lease.read_current(tmp_path)
    assert lease is not None and lease.epoch == 2 and lease.worker_id == winners[0]


def test_renewal_keeps_a_lease_alive_and_silence_expires_it(tmp_path: Path) -> None:
    clock = FakeClock()
    observer = job_lease.LeaseObserver(clock)
    keeper = job_lease.LeaseKeeper(lease_s=3.0)
    lease = job_lease.try_claim(tmp_path, 1, "a", "a1", 3.0)
    assert lease is not None
    keeper.hold("job", tmp_path, lease)
    for _ in range(5):  # renewed every second of the observer's time: never expired
        seen = job_lease.read_current(tmp_path)
        assert seen is not None and not observer.expired("job", seen)
        clock.now += 1.0
        keeper.renew_all()
    assert keeper.take_lost() == []
    keeper.drop("job")  # the holder goes silent
    seen = job_lease.read_current(tmp_path)
    assert seen is not None and not observer.expired("job", seen)
    clock.now += 2.9
    assert not observer.expired("job", job_lease.read_current(tmp_path))  # type: ignore[arg-type]
    clock.now += 0.2
    assert observer.expired("job", job_lease.read_current(tmp_path))  # type: ignore[arg-type]


def test_expiry_ignores_the_holders_wall_clock(tmp_path: Path) -> None:
    """A holder whose clock is an hour behind still holds its lease while it renews."""
    lease = job_lease.try_claim(tmp_path, 1, "a", "a1", 2.0)
    assert lease is not None
    raw = json.loads(lease_file(tmp_path, 1).read_text())
    raw["renewed_unix_ms"] -= 3_600_000
    lease_file(tmp_path, 1).write_text(json.dumps(raw))
    clock = FakeClock()
    observer = job_lease.LeaseObserver(clock)
    seen = job_lease.read_current(tmp_path)
    assert seen is not None and not observer.expired("job", seen)


def lease_file(job_dir: Path, epoch: int) -> Path:
    return job_lease.lease_path(job_dir, epoch)


def test_short_lease_with_the_keeper_thread(tmp_path: Path) -> None:
    keeper = job_lease.LeaseKeeper(lease_s=0.3)
    observer = job_lease.LeaseObserver()
    lease = job_lease.try_claim(tmp_path, 1, "a", "a1", 0.3)
    assert lease is not None
    keeper.hold("job", tmp_path, lease)
    keeper.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # five lease periods: renewed all along
            current = job_lease.read_current(tmp_path)
            assert current is not None and not observer.expired("job", current)
            time.sleep(0.05)
    finally:
        keeper.stop()
    deadline = time.monotonic() + 5.0
    while not observer.expired("job", job_lease.read_current(tmp_path)):  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "a lease nobody renews must expire"
        time.sleep(0.05)


def test_released_lease_is_expired_at_once(tmp_path: Path) -> None:
    keeper = job_lease.LeaseKeeper(lease_s=60.0)
    lease = job_lease.try_claim(tmp_path, 1, "a", "a1", 60.0)
    assert lease is not None
    keeper.hold("job", tmp_path, lease)
    observer = job_lease.LeaseObserver(FakeClock())
    assert not observer.expired("job", job_lease.read_current(tmp_path))  # type: ignore[arg-type]
    keeper.release("job")
    current = job_lease.read_current(tmp_path)
    assert current is not None and current.released and observer.expired("job", current)
    assert keeper.epoch("job") == 0


def test_stolen_lease_is_reported_lost(tmp_path: Path) -> None:
    keeper = job_lease.LeaseKeeper(lease_s=5.0)
    lease = job_lease.try_claim(tmp_path, 1, "a", "a1", 5.0)
    assert lease is not None
    keeper.hold("job", tmp_path, lease)
    assert keeper.epoch("job") == 1
    stolen = job_lease.try_claim(tmp_path, 2, "b", "b1", 5.0)
    assert stolen is not None
    # The old epoch cannot be claimed again, and renewing it fails.
    assert job_lease.try_claim(tmp_path, 2, "c", "c1", 5.0) is None
    with pytest.raises(job_lease.LeaseLost):
        job_lease.renew(lease, tmp_path)
    keeper.renew_all()
    assert keeper.take_lost() == ["job"]
    assert keeper.epoch("job") == 0
    current = job_lease.read_current(tmp_path)
    assert current is not None and current.worker_id == "b" and current.epoch == 2
    # The loser's renewal wrote nothing over the new holder's lease.
    assert json.loads(lease_file(tmp_path, 2).read_text())["worker_id"] == "b"


def test_fence_and_fenced_progress_writer(tmp_path: Path) -> None:
    assert job_lease.try_claim(tmp_path, 1, "a", "a1", 5.0) is not None
    fence = job_lease.LeaseFence(tmp_path, 1)
    writer = ProgressWriter(tmp_path / "progress.jsonl", fence)
    writer.write(finetune_pb2.JobEvent(log="before"))
    assert job_lease.try_claim(tmp_path, 2, "b", "b1", 5.0) is not None
    with pytest.raises(job_lease.LeaseLost):
        fence.check()
    with pytest.raises(job_lease.LeaseLost):
        writer.write(finetune_pb2.JobEvent(log="after"))
    writer.close()
    assert (tmp_path / "progress.jsonl").read_text().count("\n") == 1


def test_training_process_stops_once_its_epoch_is_replaced(tmp_path: Path, tiny_model) -> None:
    """A real job process under epoch 1 trains; another worker claims epoch 2; the
    process exits with EXIT_LEASE_LOST and writes no progress, checkpoint or artifact
    after it noticed."""
    job_dir = tmp_path / "ft-fenced"
    job_dir.mkdir()
    write_jsonl(job_dir / "data.jsonl", small_rows(24))
    config = TrainConfig(
        method="lora",
        max_steps=2000,
        batch_size=2,
        max_seq_length=32,
        eval_fraction=0.0,
        checkpoint_every_steps=1,
    )
    run = {"config": config.to_dict(), "model": tiny_model.path, "device": "cpu", "threads": 1}
    (job_dir / "job.json").write_text(json.dumps({"job": {"job_id": "ft-fenced"}, "run": run}))
    assert job_lease.try_claim(job_dir, 1, "a", "a1", 5.0) is not None
    log = open(tmp_path / "process.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.job_process", "--job-dir", str(job_dir)]
        + ["--lease-epoch", "1"],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        progress = job_dir / "progress.jsonl"
        deadline = time.monotonic() + 120
        while '"checkpoint"' not in (progress.read_text() if progress.exists() else ""):
            assert proc.poll() is None, (tmp_path / "process.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.1)
        assert job_lease.try_claim(job_dir, 2, "b", "b1", 5.0) is not None
        claimed_at = progress.stat().st_size
        assert proc.wait(60) == EXIT_LEASE_LOST, (tmp_path / "process.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = progress.read_text()
    # At most the line of the step that was being written when the claim landed.
    assert text[claimed_at:].count("\n") <= 1, text[claimed_at:]
    assert "stateChange" not in text  # no terminal state: the new holder reports
    assert not (job_dir / "work" / "artifact").exists()
    assert "lease lost" in (tmp_path / "process.log").read_text()


def test_job_manager_stops_its_trainer_when_its_lease_is_taken(tmp_path: Path, tiny_model) -> None:
    """A real JobManager takes a job that has no lease (epoch 1) and trains it; another
    worker claims epoch 2; the manager kills its training process and writes nothing
    more to the job (it mirrors it from then on)."""
    import asyncio

    from worker.jobs import EVENTS_FILE, JobManager, JobsConfig

    jobs_dir = tmp_path / "jobs"
    job_dir = jobs_dir / "ft-stolen"
    job_dir.mkdir(parents=True)
    write_jsonl(job_dir / "data.jsonl", small_rows(24))
    config = TrainConfig(
        method="lora", max_steps=2000, batch_size=2, max_seq_length=32, eval_fraction=0.0
    )
    job_json = {
        "job": {"job_id": "ft-stolen", "state": "QUEUED", "created_unix_ms": 1},
        "request": {},
        "run": {
            "config": config.to_dict(),
            "model": tiny_model.path,
            "device": "cpu",
            "threads": 1,
            "store_dir": str(tmp_path / "store"),
            "output_name": "stolen",
        },
    }
    (job_dir / "job.json").write_text(json.dumps(job_json))
    manager = JobManager(
        JobsConfig(
            jobs_dir=jobs_dir,
            store_dir=str(tmp_path / "store"),
            data_dir=tmp_path / "data",
            worker_id="worker-a",
            lease_s=1.0,
        )
    )

    async def scenario() -> tuple[int, int]:
        await manager.start()
        try:
            job = manager.jobs["ft-stolen"]
            assert job.held and job.lease_epoch == 1
            deadline = time.monotonic() + 120
            while not any(e.WhichOneof("event") == "metrics" for e in job.events):
                assert time.monotonic() < deadline, "no training step in 120 s"
                await asyncio.sleep(0.1)
            assert job.process is not None
            pid = job.process.pid
            assert job_lease.try_claim(job_dir, 2, "worker-b", "b1", 60.0) is not None
            while job.held or job.process is not None:
                assert time.monotonic() < deadline, "the lost lease was not noticed"
                await asyncio.sleep(0.05)
            size = (job_dir / EVENTS_FILE).stat().st_size
            await asyncio.sleep(1.5)  # several ticks and a scan: still nothing written
            assert (job_dir / EVENTS_FILE).stat().st_size == size
            assert not manager.jobs["ft-stolen"].held  # worker-b's live lease is respected
            return pid, size
        finally:
            await manager.stop()

    pid, _ = asyncio.run(scenario())
    # Gone (a reused pid would not be this job's trainer).
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or str(job_dir).encode() not in cmdline.read_bytes()
    holders = [
        json.loads(line).get("log", "")
        for line in (job_dir / EVENTS_FILE).read_text().splitlines()
        if "lease holder" in line
    ]
    assert holders == [
        "lease holder: worker worker-a took the job over (epoch 1): it had no lease"
    ], holders
    # worker-b's lease is untouched: the loser's stop released nothing of it.
    lease = job_lease.read_current(job_dir)
    assert lease is not None and lease.epoch == 2 and lease.worker_id == "worker-b"
    assert not lease.released


def test_a_damaged_lease_expires_only_if_it_stays_unchanged(tmp_path: Path) -> None:
    assert job_lease.try_claim(tmp_path, 1, "a", "a1", 5.0) is not None
    lease_file(tmp_path, 1).write_text("{not json")
    clock = FakeClock()
    observer = job_lease.LeaseObserver(clock)
    damaged = job_lease.read_current(tmp_path, fallback_lease_s=3.0)
    assert damaged is not None and damaged.epoch == 1 and not damaged.released
    assert not observer.expired("job", damaged)
    clock.now += 3.0
    assert observer.expired("job", job_lease.read_current(tmp_path, 3.0))  # type: ignore[arg-type]

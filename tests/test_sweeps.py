"""Hyperparameter sweeps (issue 21): the plan of trials, validation on a real worker, and
a 2 learning rates x 2 LoRA ranks grid on the real default model through a real router:
four trials run as ordinary jobs, the best by eval loss is published under the sweep's
name and serves, WatchSweep shows all four, and the CLI prints the table."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from common.errors import InvalidArgument, NotFound
from common.model_store import ModelStore
from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from common.validation import sweep_spec_from_pb
from llmcluster.sweep_cli import LiveTable, apply_event, format_trials
from tests.procs import REPO_ROOT, Proc, free_port, start_router, start_worker
from tests.test_finetune import small_hp, small_jsonl, temp_home
from worker.jobs import JobManager, JobsConfig
from worker.sweeps import SweepManager, plan_trials, suggest_tpe

NAME = "sweep-bot"
LRS = [1e-4, 1e-2]
RANKS = [2, 4]


def _request(**overrides) -> finetune_pb2.CreateSweepRequest:
    values = dict(
        base=finetune_pb2.CreateJobRequest(
            output_name=NAME,
            dataset_jsonl=small_jsonl(),
            hyperparameters=small_hp(max_steps=2, checkpoint_every_steps=0),
        ),
        space=finetune_pb2.SearchSpace(learning_rate=LRS, lora_r=RANKS),
        strategy=finetune_pb2.GRID,
    )
    values.update(overrides)
    return finetune_pb2.CreateSweepRequest(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the plan


def test_grid_plan_is_every_combination_in_order() -> None:
    plan = plan_trials(sweep_spec_from_pb(_request()))
    assert plan == [
        {"learning_rate": 1e-4, "lora_r": 2},
        {"learning_rate": 1e-4, "lora_r": 4},
        {"learning_rate": 1e-2, "lora_r": 2},
        {"learning_rate": 1e-2, "lora_r": 4},
    ]
    capped = plan_trials(sweep_spec_from_pb(_request(max_trials=3)))
    assert capped == plan[:3]


def test_random_plan_is_seeded_and_stays_in_range() -> None:
    request = _request(
        strategy=finetune_pb2.RANDOM,
        space=finetune_pb2.SearchSpace(
            learning_rate_range=finetune_pb2.FloatRange(min=1e-5, max=1e-3, log=True),
            lora_r=[4, 8, 16],
        ),
        max_trials=40,
        seed=7,
    )
    plan = plan_trials(sweep_spec_from_pb(request))
    assert plan == plan_trials(sweep_spec_from_pb(request))  # a restart replans the same
    assert len(plan) == 40
    assert all(1e-5 <= t["learning_rate"] <= 1e-3 for t in plan)
    assert {t["lora_r"] for t in plan} == {4, 8, 16}
    # Log-uniform: about half the draws fall below the geometric middle (1e-4).
    low = sum(1 for t in plan if t["learning_rate"] < 1e-4)
    assert 10 <= low <= 30, low
    request.seed = 8
    assert plan_trials(sweep_spec_from_pb(request)) != plan


def _tpe_spec(max_trials: int = 30):
    return sweep_spec_from_pb(
        _request(
            strategy=finetune_pb2.TPE,
            space=finetune_pb2.SearchSpace(
                learning_rate_range=finetune_pb2.FloatRange(min=1e-5, max=1e-1, log=True),
                lora_r=[4, 8],
            ),
            max_trials=max_trials,
            seed=3,
        )
    )


def test_tpe_learns_from_the_trials_before() -> None:
    """Eval loss = distance of log10(lr) from -4: after its 10 random start-up trials,
    TPE's picks land nearer the optimum than random draws would (mean 1.25)."""
    import math

    spec = _tpe_spec()
    history: list[finetune_pb2.Trial] = []
    picks = []
    for number in range(1, 21):
        params = suggest_tpe(spec, history, number)
        assert params == suggest_tpe(spec, history, number)  # a restart asks the same
        assert 1e-5 <= params["learning_rate"] <= 1e-1 and params["lora_r"] in (4, 8)
        distance = abs(math.log10(params["learning_rate"]) + 4)
        picks.append(distance)
        history.append(
            finetune_pb2.Trial(
                number=number,
                params=finetune_pb2.Hyperparameters(**params),
                job_id=f"ft-{number}",
                state=finetune_pb2.SUCCEEDED,
                eval_loss=distance,
            )
        )
    assert sum(picks[10:]) / 10 < 0.8, picks
    # A failed trial counts as a failure, a launched one as pending: both are accepted.
    history[-1].state = finetune_pb2.FAILED
    history[-2].state = finetune_pb2.RUNNING
    assert set(suggest_tpe(spec, history, 21)) == {"learning_rate", "lora_r"}
    assert plan_trials(spec) == [{}] * 30  # TPE trials are chosen at launch


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(
                space=finetune_pb2.SearchSpace(
                    learning_rate_range=finetune_pb2.FloatRange(min=1e-5, max=1e-3)
                )
            ),
            "a grid sweep takes listed values only",
        ),  # fmt: skip
        (dict(strategy=finetune_pb2.RANDOM), "a random sweep needs a trial budget"),
        (dict(strategy=finetune_pb2.TPE), "a tpe sweep needs a trial budget"),
        (dict(space=finetune_pb2.SearchSpace()), "space is empty"),
        (dict(space=finetune_pb2.SearchSpace(learning_rate=[1e-4, -1.0])), "must be > 0"),
        (dict(space=finetune_pb2.SearchSpace(lora_r=[4, 4])), "values repeat"),
        (dict(objective="accuracy"), "objective must be one of eval_loss"),
        (dict(parallelism=99), "parallelism must be in [1, 16]"),
    ],
)
def test_bad_sweeps_are_refused(overrides, message) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        sweep_spec_from_pb(_request(**overrides))


# ------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return temp_home(tmp_path_factory.mktemp("sweep-home"))


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[tuple[Proc, Proc]]:
    worker = start_worker(
        "--dtype",
        "float32",
        "--worker-id",
        "sweep-worker",
        "--self-test-interval-s",
        "0",
        env={"LLMCLUSTER_HOME": str(home)},
    )
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address])
        router.wait_healthy(timeout_s=60, service="llmcluster.v1.FineTune")
        yield router, worker
    finally:
        if router is not None:
            router.stop()
        worker.signal(signal.SIGTERM)
        worker.stop()


@pytest.fixture(scope="module")
def channel(cluster: tuple[Proc, Proc]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster[0].address) as ch:
        yield ch


@pytest.fixture(scope="module")
def ft(channel: grpc.Channel) -> finetune_pb2_grpc.FineTuneStub:
    return finetune_pb2_grpc.FineTuneStub(channel)


def test_bad_base_job_is_refused_and_leaves_nothing(ft, home: Path) -> None:
    bad_data = _request()
    bad_data.base.dataset_jsonl = '{"prompt": "a"}\n'
    bad_name = _request()
    bad_name.base.output_name = "x" * 60  # trial adapters would pass 64 characters
    no_eval = _request()
    no_eval.base.hyperparameters.eval_fraction = 0.0
    # Every trial's batch must split across the base job's ranks, not just the first's.
    uneven = _request(space=finetune_pb2.SearchSpace(batch_size=[4, 3]))
    uneven.base.nproc = 2
    for request, text in (
        (uneven, "nproc 2 must divide hyperparameters.batch_size 3"),
        (bad_data, "dataset"),
        (bad_name, "too long for a sweep"),
        (no_eval, "eval_fraction must be > 0"),
        (_request(space=finetune_pb2.SearchSpace()), "space is empty"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            ft.CreateSweep(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert text in info.value.details()
    assert not list((home / "jobs" / "sweeps").iterdir())
    assert ft.ListSweeps(finetune_pb2.ListSweepsRequest(), timeout=30).sweeps == []
    with pytest.raises(grpc.RpcError) as info:
        ft.GetSweep(finetune_pb2.GetSweepRequest(sweep_id="sw-nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def finished_sweep(ft) -> tuple[finetune_pb2.Sweep, list[finetune_pb2.SweepEvent]]:
    request = _request(parallelism=2, client_token="sweep-1", discard_trials=True)
    sweep = ft.CreateSweep(request, timeout=120)
    assert ft.CreateSweep(request, timeout=120).sweep_id == sweep.sweep_id  # idempotent
    assert sweep.state == finetune_pb2.RUNNING and sweep.planned_trials == 4
    events = list(
        ft.WatchSweep(finetune_pb2.WatchSweepRequest(sweep_id=sweep.sweep_id), timeout=900)
    )
    return ft.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep.sweep_id), timeout=30), events


def test_four_trials_run_as_jobs_and_the_best_is_published(ft, finished_sweep, home: Path) -> None:
    sweep, events = finished_sweep
    assert sweep.state == finetune_pb2.SUCCEEDED, sweep.error
    assert [t.number for t in sweep.trials] == [1, 2, 3, 4]
    assert {(t.params.learning_rate, t.params.lora_r) for t in sweep.trials} == {
        (lr, r) for lr in LRS for r in RANKS
    }
    jobs = {}
    for trial in sweep.trials:
        assert trial.state == finetune_pb2.SUCCEEDED and trial.HasField("eval_loss"), trial
        job = ft.GetJob(finetune_pb2.GetJobRequest(job_id=trial.job_id), timeout=30)
        assert job.state == finetune_pb2.SUCCEEDED
        # Each trial is an ordinary job with the trial's hyperparameters.
        assert job.hyperparameters.learning_rate == pytest.approx(trial.params.learning_rate)
        assert job.hyperparameters.lora_r == trial.params.lora_r
        assert job.eval_after.eval_loss == pytest.approx(trial.eval_loss)
        jobs[trial.number] = job
    assert len({j.job_id for j in jobs.values()}) == 4
    best = min(sweep.trials, key=lambda t: t.eval_loss)
    assert sweep.best_trial == best.number
    assert [t.number for t in sweep.trials if t.best] == [best.number]
    assert sweep.best_ref == f"{NAME}@1"
    store = ModelStore(home / "store")
    meta = store.resolve(sweep.best_ref).metadata
    assert meta["sweep_id"] == sweep.sweep_id and meta["sweep_best"] is True
    assert meta["sweep_trial"] == best.number and meta["trial_ref"] == best.artifact_ref
    # discard_trials: the trials' own adapters are gone; only the published best is left.
    assert all(t.artifact_ref.startswith(f"{NAME}.") for t in sweep.trials)
    assert {r.name for r in store.list()} == {NAME}

    # WatchSweep showed all four trials to the end, and the sweep's own life.
    seen = {e.trial.number: e.trial for e in events if e.HasField("trial")}
    assert set(seen) == {1, 2, 3, 4}
    assert all(t.state == finetune_pb2.SUCCEEDED for t in seen.values())
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].state == finetune_pb2.SUCCEEDED and sweep.best_ref in events[-1].message
    listed = ft.ListSweeps(finetune_pb2.ListSweepsRequest(), timeout=30).sweeps
    assert [s.sweep_id for s in listed] == [sweep.sweep_id]


def test_the_best_adapter_serves(channel: grpc.Channel, finished_sweep) -> None:
    sweep, _ = finished_sweep
    gen = generate_pb2_grpc.GenerateStub(channel)
    reply = gen.Generate(
        generate_pb2.GenerateRequest(
            adapter=NAME,
            prompt="Hello",
            params=generate_pb2.SamplingParams(max_new_tokens=4),
        ),
        timeout=120,
    )
    assert reply.usage.completion_tokens >= 1 and reply.usage.adapter == sweep.best_ref


def test_live_table_redraws_the_trials_in_place(finished_sweep) -> None:
    """What ``sweep create`` / ``watch`` show on a terminal: the table, redrawn over
    itself as each event brings a trial's new state."""
    final, events = finished_sweep
    sweep = finetune_pb2.Sweep()
    sweep.CopyFrom(final)
    sweep.ClearField("trials")  # the trials as they were before any event
    sweep.trials.extend(finetune_pb2.Trial(number=n) for n in (1, 2, 3, 4))
    out = io.StringIO()
    live = LiveTable(out)
    for event in events:
        apply_event(sweep, event)
        live.draw(format_trials(sweep))
    table = format_trials(sweep)
    assert [t.state for t in sweep.trials] == [finetune_pb2.SUCCEEDED] * 4
    assert sweep.state == finetune_pb2.SUCCEEDED
    # Every drawing after the first moves up over the previous one (header, 4 trials,
    # summary) and clears it; the screen ends with the final table.
    assert out.getvalue().count("\x1b[6F\x1b[J") == len(events) - 1
    assert out.getvalue().endswith(table + "\n")


def test_cli_prints_the_table_and_the_best(cluster, finished_sweep) -> None:
    sweep, _ = finished_sweep
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcluster",
            "finetune",
            "sweep",
            "get",
            sweep.sweep_id,
            "--target",
            cluster[0].address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "lr", "lora_r", "alpha"]
    assert len(lines) == 6  # header, four trials, summary
    best_line = next(line for line in lines[1:5] if line.endswith("best"))
    assert best_line.split()[0] == str(sweep.best_trial)
    assert f"best: trial {sweep.best_trial} -> {sweep.best_ref}" in lines[-1]
    raw = subprocess.run(
        [sys.executable, "-m", "llmcluster", "finetune", "sweep", "get", sweep.sweep_id,
         "--json", "--target", cluster[0].address],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert json.loads(raw.stdout)["best_ref"] == sweep.best_ref
    # watch (what create runs after creating): one line per event, then the table.
    watched = subprocess.run(
        [sys.executable, "-m", "llmcluster", "finetune", "sweep", "watch", sweep.sweep_id,
         "--target", cluster[0].address],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert watched.returncode == 0, watched.stderr
    out = watched.stdout.splitlines()
    assert out[0].startswith("sweep created: 4 grid trial(s)")
    assert sum(1 for line in out if line.startswith("trial 4 ")) >= 2  # launched, ended
    assert out[-6:] == lines


def test_cancel_stops_the_trials_and_publishes_nothing(ft, finished_sweep, home: Path) -> None:
    sweep = ft.CreateSweep(_request(), timeout=120)
    cancelled = ft.CancelSweep(finetune_pb2.CancelSweepRequest(sweep_id=sweep.sweep_id), timeout=30)
    assert cancelled.sweep_id == sweep.sweep_id
    events = list(
        ft.WatchSweep(finetune_pb2.WatchSweepRequest(sweep_id=sweep.sweep_id), timeout=300)
    )
    assert events[-1].state == finetune_pb2.CANCELLED
    final = ft.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep.sweep_id), timeout=30)
    assert final.state == finetune_pb2.CANCELLED and not final.best_ref
    assert [t.state for t in final.trials] == [finetune_pb2.CANCELLED] * 4
    first = ft.GetJob(finetune_pb2.GetJobRequest(job_id=final.trials[0].job_id), timeout=30)
    assert first.state == finetune_pb2.CANCELLED
    assert not any(t.job_id for t in final.trials[1:])  # never launched
    # Only the finished sweep's best is published under the name.
    assert [r.ref for r in ModelStore(home / "store").list(NAME)] == [f"{NAME}@1"]


@pytest.mark.slow  # ~1 min: two more training jobs
def test_a_tpe_sweep_chooses_each_trial_at_launch(ft) -> None:
    request = _request(
        strategy=finetune_pb2.TPE,
        space=finetune_pb2.SearchSpace(
            learning_rate_range=finetune_pb2.FloatRange(min=1e-4, max=1e-2, log=True),
            lora_r=RANKS,
        ),
        max_trials=2,
        seed=5,
    )
    request.base.output_name = "tpe-bot"
    sweep = ft.CreateSweep(request, timeout=120)
    assert sweep.strategy == finetune_pb2.TPE
    assert sweep.trials[0].params.HasField("learning_rate")  # trial 1 chosen, and launched
    assert not sweep.trials[1].params.ListFields()  # trial 2 not yet
    list(ft.WatchSweep(finetune_pb2.WatchSweepRequest(sweep_id=sweep.sweep_id), timeout=600))
    final = ft.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep.sweep_id), timeout=30)
    assert final.state == finetune_pb2.SUCCEEDED, final.error
    for trial in final.trials:
        assert 1e-4 <= trial.params.learning_rate <= 1e-2 and trial.params.lora_r in RANKS
        job = ft.GetJob(finetune_pb2.GetJobRequest(job_id=trial.job_id), timeout=30)
        assert job.hyperparameters.learning_rate == pytest.approx(trial.params.learning_rate)
    assert final.best_ref == "tpe-bot@1"


@pytest.mark.slow
def test_a_sweep_survives_a_worker_sigkill(tmp_path: Path) -> None:
    """The worker dies with trial 1 in flight; restarted on the same home, it resumes the
    trial's job, launches trial 2 from the stored plan, and publishes the best."""
    home = temp_home(tmp_path / "home")

    def start() -> Proc:
        proc = start_worker(
            "--dtype", "float32", "--worker-id", "sweep-restart", "--self-test-interval-s", "0",
            port=port, env={"LLMCLUSTER_HOME": str(home)},
        )  # fmt: skip
        try:
            proc.wait_healthy(timeout_s=300)
        except BaseException:
            proc.stop()
            raise
        return proc

    port = free_port()
    worker = start()
    try:
        with grpc.insecure_channel(worker.address) as ch:
            stub = finetune_pb2_grpc.FineTuneStub(ch)
            request = _request(space=finetune_pb2.SearchSpace(learning_rate=LRS))
            sweep = stub.CreateSweep(request, timeout=120)
        worker.signal(signal.SIGKILL)
        worker.stop()
        worker = start()
        with grpc.insecure_channel(worker.address) as ch:
            stub = finetune_pb2_grpc.FineTuneStub(ch)
            events = list(
                stub.WatchSweep(
                    finetune_pb2.WatchSweepRequest(sweep_id=sweep.sweep_id), timeout=600
                )
            )
            final = stub.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep.sweep_id), timeout=30)
    finally:
        worker.stop()
    assert final.state == finetune_pb2.SUCCEEDED, final.error
    assert [t.state for t in final.trials] == [finetune_pb2.SUCCEEDED] * 2
    assert final.best_ref == f"{NAME}@1"
    # Trial 1 was launched once (its client token), before and after the restart.
    assert sum(1 for e in events if "trial 1 launched" in e.message) == 1
    assert len({t.job_id for t in final.trials}) == 2


def test_workers_sharing_a_jobs_folder_drive_a_running_sweep_once(tmp_path: Path) -> None:
    """Two workers on one home load the same RUNNING sweep: the first to load it takes its
    lock and drives (and shows) it; the other answers NOT_FOUND for it, so the router
    finds it on the driver. When the driver is gone, a worker starting next takes over."""
    jobs_dir = tmp_path / "jobs"
    sweep_dir = jobs_dir / "sweeps" / "sw-1"
    sweep_dir.mkdir(parents=True)
    pb = finetune_pb2.Sweep(
        sweep_id="sw-1",
        state=finetune_pb2.RUNNING,
        output_name=NAME,
        trials=[finetune_pb2.Trial(number=1, state=finetune_pb2.QUEUED)],
    )
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"sweep": json_format.MessageToDict(pb), "plan": [{}]})
    )

    def manager() -> SweepManager:
        jobs = JobManager(JobsConfig(jobs_dir=jobs_dir, store_dir="", data_dir=tmp_path))
        # A long poll: the loop must not advance the sweep while the test looks at it.
        return SweepManager(jobs, ModelStore(tmp_path / "store"), poll_interval_s=3600)

    async def scenario() -> None:
        first, second = manager(), manager()
        await first.start()
        await second.start()
        try:
            assert first.get("sw-1").sweep_id == "sw-1"
            assert [s.sweep_id for s in first.list()] == ["sw-1"]
            with pytest.raises(NotFound):
                second.get("sw-1")
            assert second.list() == []
        finally:
            await second.stop()
            await first.stop()  # releases the lock, as the process's death would
        third = manager()
        await third.start()
        try:
            assert third.get("sw-1").lock is not None
        finally:
            await third.stop()

    asyncio.run(scenario())

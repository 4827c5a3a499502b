"""Hyperparameter sweeps on a worker: a plan of trials (a grid, seeded random draws, or
Optuna's TPE sampler choosing each trial from the results so far), each an ordinary fine-tuning job
of :class:`worker.jobs.JobManager` (own events, trace, cancel, crash recovery), at most
``parallelism`` of them queued or running at once; when every trial has ended, the best
by the objective (eval loss after training) is published again as the sweep's
``output_name@version`` and marked best.

On disk, one folder per sweep under ``<jobs_dir>/sweeps``::

    <sweep_id>/request.json   the CreateSweepRequest (protobuf JSON, dataset included):
                              what later trials are launched from, after a restart too
    <sweep_id>/sweep.json     the Sweep (protobuf JSON), the plan, bookkeeping
    <sweep_id>/events.jsonl   append-only SweepEvents, sequence numbers from 1

    <sweep_id>/lock           flock()ed by the worker driving the sweep

Workers may share a jobs folder (``llmcluster up`` starts them on one home). A running
sweep is driven by exactly one of them: the one holding its lock, which the kernel
releases when that process dies. The creating worker takes it; a worker loading the
folder takes the lock of each RUNNING sweep it can, and shows only the sweeps it drives or that
had ended, so the router finds a live sweep on its driver.

The plan (every trial's hyperparameters) is fixed at creation, so a sweep found RUNNING
at start-up goes on launching the remaining trials where it stopped; a trial's job is
created with the client token ``<sweep_id>-t<n>``, so a crash between creating the job
and recording it cannot launch the trial twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from common.errors import InvalidArgument, NotFound, RequestError
from common.model_store import ModelStore, validate_name
from common.pb import finetune_pb2
from common.validation import SweepSpec, sweep_spec_from_pb
from worker.jobs import (
    METHOD_NAMES,
    TERMINAL_STATES,
    JobManager,
    follow_events,
    hyperparameters_to_config,
    now_ms,
)

logger = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
SWEEP_FILE = "sweep.json"
REQUEST_FILE = "request.json"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = "lock"
# Integer-valued Hyperparameters fields (the rest of SWEEP_CHOICE_FIELDS are floats).
_INT_FIELDS = ("lora_r", "epochs", "batch_size")


def _dump(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def plan_trials(spec: SweepSpec) -> list[dict[str, float | int]]:
    """Every trial's swept hyperparameters: the grid's combinations (in the order of the
    listed values, the last dimension fastest) up to the budget, or ``max_trials``
    independent draws seeded by ``spec.seed`` (log-uniform for a log range). TPE trials
    are planned empty: :func:`suggest_tpe` fills each one in when it is launched."""
    names = list(spec.choices)
    if spec.strategy == "tpe":
        return [{} for _ in range(spec.max_trials)]
    if spec.strategy == "grid":
        combos = itertools.product(*(spec.choices[n] for n in names))
        plan = [dict(zip(names, combo, strict=True)) for combo in combos]
        plan = plan[: spec.max_trials]
    else:
        rng = random.Random(spec.seed)
        plan = []
        for _ in range(spec.max_trials):
            trial: dict[str, float | int] = {n: rng.choice(spec.choices[n]) for n in names}
            if spec.learning_rate_range is not None:
                low, high, log = spec.learning_rate_range
                trial["learning_rate"] = (
                    math.exp(rng.uniform(math.log(low), math.log(high)))
                    if log
                    else rng.uniform(low, high)
                )
            plan.append(trial)
    return [{k: int(v) if k in _INT_FIELDS else float(v) for k, v in t.items()} for t in plan]


def suggest_tpe(
    spec: SweepSpec, history: list[finetune_pb2.Trial], number: int
) -> dict[str, float | int]:
    """Trial ``number``'s values from Optuna's TPE sampler, given the trials launched
    before it (ask-and-tell: a study rebuilt from ``history`` each time, so nothing but
    the sweep record needs to survive a restart). Succeeded trials count with their eval
    loss, failed and cancelled ones as failures, running ones as pending (constant liar).
    The first ``n_startup_trials`` are random draws, as in Optuna."""
    import optuna  # only TPE sweeps need it
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions: dict[str, Any] = {
        name: CategoricalDistribution([int(v) if name in _INT_FIELDS else float(v) for v in values])
        for name, values in spec.choices.items()
    }
    if spec.learning_rate_range is not None:
        low, high, log = spec.learning_rate_range
        distributions["learning_rate"] = FloatDistribution(low, high, log=log)
    sampler = optuna.samplers.TPESampler(
        seed=spec.seed + number,
        n_startup_trials=max(1, min(10, spec.max_trials // 3)),
        constant_liar=True,
    )
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for trial in history:
        params = {name: getattr(trial.params, name) for name in distributions}
        if not trial.job_id or not all(trial.params.HasField(n) for n in distributions):
            continue
        if trial.state == finetune_pb2.SUCCEEDED and trial.HasField("eval_loss"):
            study.add_trial(
                create_trial(params=params, distributions=distributions, value=trial.eval_loss)
            )
        elif trial.state in TERMINAL_STATES:
            study.add_trial(
                create_trial(params=params, distributions=distributions, state=TrialState.FAIL)
            )
        else:
            study.add_trial(
                create_trial(params=params, distributions=distributions, state=TrialState.RUNNING)
            )
    asked = study.ask(distributions)
    return {k: int(v) if k in _INT_FIELDS else float(v) for k, v in asked.params.items()}


def trial_output_name(output_name: str, sweep_id: str, number: int) -> str:
    """The name a trial's own adapter is published under (``name.<sweep>-t<n>``)."""
    return f"{output_name}.{sweep_id.rsplit('-', 1)[-1]}-t{number}"


@dataclass
class Sweep:
    """One sweep in memory: the protobuf view, its plan, events and bookkeeping."""

    dir: Path
    pb: finetune_pb2.Sweep
    plan: list[dict[str, Any]]
    owner: str = ""
    traceparent: str = ""
    cancel_requested: bool = False
    events: list[finetune_pb2.SweepEvent] = field(default_factory=list)
    changed: asyncio.Condition | None = None
    lock: Any = None  # the open, flock()ed lock file while this worker drives the sweep

    @property
    def visible(self) -> bool:
        """Shown by this worker: driven here, or ended (another worker drives the rest)."""
        return self.lock is not None or self.terminal

    @property
    def sweep_id(self) -> str:
        return self.pb.sweep_id

    @property
    def terminal(self) -> bool:
        return self.pb.state in TERMINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": _dump(self.pb),
            "plan": self.plan,
            "owner": self.owner,
            "traceparent": self.traceparent,
            "cancel_requested": self.cancel_requested,
        }


class SweepManager:
    """Owns this worker's sweeps; runs on the worker's event loop beside the job manager,
    whose jobs are the trials."""

    def __init__(
        self,
        jobs: JobManager,
        store: ModelStore,
        sweeps_dir: Path | None = None,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.jobs = jobs
        self.store = store
        self.sweeps_dir = sweeps_dir or jobs.config.jobs_dir / SWEEPS_DIR
        self.poll_interval_s = poll_interval_s
        self.sweeps: dict[str, Sweep] = {}
        self._by_token: dict[tuple[str, str], str] = {}
        self._create_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sweeps_dir.mkdir(parents=True, exist_ok=True)
        self._load()

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        for path in sorted(self.sweeps_dir.glob(f"*/{SWEEP_FILE}")):
            try:
                raw = json.loads(path.read_text())
                sweep = Sweep(
                    dir=path.parent,
                    pb=json_format.ParseDict(raw["sweep"], finetune_pb2.Sweep()),
                    plan=list(raw.get("plan", [])),
                    owner=str(raw.get("owner", "")),
                    traceparent=str(raw.get("traceparent", "")),
                    cancel_requested=bool(raw.get("cancel_requested", False)),
                )
                sweep.events = self._read_events(path.parent / EVENTS_FILE)
            except (OSError, ValueError, KeyError, json_format.ParseError) as exc:
                logger.error("skipping unreadable sweep folder %s: %s", path.parent, exc)
                continue
            self.sweeps[sweep.sweep_id] = sweep
            if sweep.pb.client_token:
                self._by_token[(sweep.owner, sweep.pb.client_token)] = sweep.sweep_id
            # Claimed at load: GetSweep answers while the model loads, and a second
            # worker starting on the same folder meanwhile leaves it alone.
            if not sweep.terminal and not self._claim(sweep):
                logger.info("sweep %s is driven by another worker", sweep.sweep_id)
        if self.sweeps:
            logger.info("loaded %d sweep(s) from %s", len(self.sweeps), self.sweeps_dir)

    @staticmethod
    def _read_events(path: Path) -> list[finetune_pb2.SweepEvent]:
        events: list[finetune_pb2.SweepEvent] = []
        if not path.exists():
            return events
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                events.append(json_format.Parse(line, finetune_pb2.SweepEvent()))
            except json_format.ParseError:
                logger.warning("skipping torn event line in %s", path)  # a crash mid-append
        return events

    def _save(self, sweep: Sweep) -> None:
        tmp = sweep.dir / f".{SWEEP_FILE}.tmp"
        tmp.write_text(json.dumps(sweep.to_json(), indent=1))
        os.replace(tmp, sweep.dir / SWEEP_FILE)

    @staticmethod
    def _claim(sweep: Sweep) -> bool:
        """Takes the sweep's lock (non-blocking); False when another live process has it."""
        fh = open(sweep.dir / LOCK_FILE, "a")  # noqa: SIM115 - held while driving
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        sweep.lock = fh
        return True

    @staticmethod
    def _release(sweep: Sweep) -> None:
        if sweep.lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(sweep.lock, fcntl.LOCK_UN)
            sweep.lock.close()
            sweep.lock = None

    def _condition(self, sweep: Sweep) -> asyncio.Condition:
        if sweep.changed is None:
            sweep.changed = asyncio.Condition()
        return sweep.changed

    async def _record(
        self, sweep: Sweep, message: str, trial: finetune_pb2.Trial | None = None
    ) -> None:
        """Appends one event (the trial as it is now, the sweep's state), saves, wakes
        watchers."""
        event = finetune_pb2.SweepEvent(
            sweep_id=sweep.sweep_id,
            sequence=len(sweep.events) + 1,
            time_unix_ms=now_ms(),
            state=sweep.pb.state,
            message=message,
        )
        if trial is not None:
            event.trial.CopyFrom(trial)
        sweep.events.append(event)
        with open(sweep.dir / EVENTS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json_format.MessageToJson(event, indent=None) + "\n")
        self._save(sweep)
        cond = self._condition(sweep)
        async with cond:
            cond.notify_all()

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Starts the loop; RUNNING sweeps (a restart cut them off) go on from their plan."""
        for sweep in self.sweeps.values():
            if not sweep.terminal and sweep.lock is not None:
                logger.info("resuming sweep %s", sweep.sweep_id)
        self._task = asyncio.create_task(self._loop(), name="finetune-sweeps")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for sweep in self.sweeps.values():
            self._release(sweep)

    async def _loop(self) -> None:
        while True:
            for sweep in list(self.sweeps.values()):
                if sweep.terminal or sweep.lock is None:
                    continue
                try:
                    await self._advance(sweep)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one sweep's failure must not stop the others
                    logger.exception("sweep %s failed", sweep.sweep_id)
                    await self._finish(sweep, finetune_pb2.FAILED, f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _advance(self, sweep: Sweep) -> None:
        """Follows the trials' jobs, launches trials into free slots, ends the sweep."""
        for trial in sweep.pb.trials:
            if trial.job_id and trial.state not in TERMINAL_STATES:
                await self._follow(sweep, trial)
        if sweep.cancel_requested:
            for trial in sweep.pb.trials:
                if not trial.job_id and trial.state not in TERMINAL_STATES:
                    trial.state = finetune_pb2.CANCELLED
                    await self._record(sweep, f"trial {trial.number} cancelled", trial)
        active = sum(1 for t in sweep.pb.trials if t.job_id and t.state not in TERMINAL_STATES)
        for trial in sweep.pb.trials:
            if active >= sweep.pb.parallelism or sweep.cancel_requested:
                break
            if not trial.job_id and trial.state not in TERMINAL_STATES:
                await self._launch(sweep, trial)
                if trial.state not in TERMINAL_STATES:
                    active += 1
        if all(t.state in TERMINAL_STATES for t in sweep.pb.trials):
            if sweep.cancel_requested:
                await self._finish(sweep, finetune_pb2.CANCELLED, "cancelled")
            else:
                await self._publish_best(sweep)

    async def _follow(self, sweep: Sweep, trial: finetune_pb2.Trial) -> None:
        job = self.jobs.jobs.get(trial.job_id)
        before = trial.SerializeToString()
        if job is None:
            trial.state = finetune_pb2.FAILED
            trial.error = f"job {trial.job_id} is gone from this worker"
        else:
            trial.state = job.pb.state
            trial.error = job.pb.error
            trial.artifact_ref = job.pb.artifact.ref
            if job.pb.HasField("eval_after"):
                trial.eval_loss = job.pb.eval_after.eval_loss
        if trial.SerializeToString() != before:
            name = finetune_pb2.JobState.Name(trial.state)  # type: ignore[arg-type]
            await self._record(sweep, f"trial {trial.number} {name}", trial)

    @staticmethod
    def _sweep_request(sweep: Sweep) -> finetune_pb2.CreateSweepRequest:
        return json_format.Parse(
            (sweep.dir / REQUEST_FILE).read_text(), finetune_pb2.CreateSweepRequest()
        )

    def _choose(
        self, sweep: Sweep, trial: finetune_pb2.Trial, request: finetune_pb2.CreateSweepRequest
    ) -> None:
        """A TPE trial's values, chosen now and saved before its job exists: a restart
        then launches the trial with these values, never a second draw."""
        if sweep.pb.strategy != finetune_pb2.TPE or trial.params.ListFields():
            return
        spec = sweep_spec_from_pb(request)
        history = [t for t in sweep.pb.trials if t.number != trial.number]
        params = suggest_tpe(spec, history, trial.number)
        trial.params.CopyFrom(finetune_pb2.Hyperparameters(**params))  # type: ignore[arg-type]
        self._save(sweep)

    def _trial_request(
        self,
        sweep: Sweep,
        trial: finetune_pb2.Trial,
        sweep_request: finetune_pb2.CreateSweepRequest | None = None,
    ) -> Any:
        request = finetune_pb2.CreateJobRequest()
        request.CopyFrom((sweep_request or self._sweep_request(sweep)).base)
        request.hyperparameters.MergeFrom(trial.params)
        request.output_name = trial_output_name(sweep.pb.output_name, sweep.sweep_id, trial.number)
        request.client_token = f"{sweep.sweep_id}-t{trial.number}"
        return request

    async def _launch(self, sweep: Sweep, trial: finetune_pb2.Trial) -> None:
        sweep_request = self._sweep_request(sweep)
        self._choose(sweep, trial, sweep_request)
        request = self._trial_request(sweep, trial, sweep_request)
        carrier = {"traceparent": sweep.traceparent} if sweep.traceparent else None
        try:
            job = await self.jobs.create(request, carrier, owner=sweep.owner)
        except RequestError as exc:
            trial.state = finetune_pb2.FAILED
            trial.error = exc.message
            await self._record(sweep, f"trial {trial.number} could not start: {exc.message}", trial)
            return
        trial.job_id = job.job_id
        trial.state = job.pb.state
        await self._record(sweep, f"trial {trial.number} launched as job {job.job_id}", trial)

    async def _publish_best(self, sweep: Sweep) -> None:
        scored = [
            t
            for t in sweep.pb.trials
            if t.state == finetune_pb2.SUCCEEDED and t.HasField("eval_loss") and t.artifact_ref
        ]
        if not scored:
            await self._finish(sweep, finetune_pb2.FAILED, "no trial succeeded with an eval loss")
            return
        best = min(scored, key=lambda t: (t.eval_loss, t.number))
        ref = await asyncio.to_thread(self._publish_once, sweep, best)
        if self._sweep_request(sweep).discard_trials:
            for trial in sweep.pb.trials:
                name = trial_output_name(sweep.pb.output_name, sweep.sweep_id, trial.number)
                await asyncio.to_thread(self.store.remove, name)
        for trial in sweep.pb.trials:
            trial.best = trial.number == best.number
        sweep.pb.best_trial = best.number
        sweep.pb.best_ref = ref
        await self._finish(
            sweep,
            finetune_pb2.SUCCEEDED,
            f"best trial {best.number} (eval loss {best.eval_loss:.4f}) published as {ref}",
            best,
        )

    def _publish_once(self, sweep: Sweep, best: finetune_pb2.Trial) -> str:
        """Publishes the best trial's adapter as the sweep's name, once: after a crash
        between publishing and recording it, the version already published is reused."""
        name = sweep.pb.output_name
        for ref in self.store.list(name) if (self.store.root / name).is_dir() else []:
            if ref.metadata.get("sweep_id") == sweep.sweep_id:
                return ref.ref
        trial_ref = self.store.resolve(best.artifact_ref)
        published = self.store.republish(
            trial_ref,
            name,
            {
                "sweep_id": sweep.sweep_id,
                "sweep_trial": best.number,
                "sweep_best": True,
                "sweep_objective": sweep.pb.objective,
                "sweep_objective_value": best.eval_loss,
                "trial_ref": best.artifact_ref,
            },
        )
        return published.ref

    async def _finish(
        self, sweep: Sweep, state: int, message: str, trial: finetune_pb2.Trial | None = None
    ) -> None:
        sweep.pb.state = state  # type: ignore[assignment]
        sweep.pb.finished_unix_ms = now_ms()
        if state == finetune_pb2.FAILED:
            sweep.pb.error = message
        logger.info("sweep %s: %s", sweep.sweep_id, message)
        await self._record(sweep, message, trial)
        self._release(sweep)

    # ------------------------------------------------------------ API

    def get(self, sweep_id: str, owner: str | None = None) -> Sweep:
        """The sweep, or NotFound (another tenant's too, with the same message)."""
        sweep = self.sweeps.get(sweep_id)
        if sweep is None or not sweep.visible or (owner is not None and sweep.owner != owner):
            raise NotFound(f"sweep {sweep_id!r} not found on worker {self.jobs.config.worker_id}")
        return sweep

    def to_pb(self, sweep: Sweep) -> finetune_pb2.Sweep:
        out = finetune_pb2.Sweep()
        out.CopyFrom(sweep.pb)
        out.worker_id = self.jobs.config.worker_id
        return out

    def list(self, limit: int = 0, owner: str | None = None) -> list[Sweep]:
        """Sweeps newest first (of one owner, if given), at most ``limit``."""
        sweeps = sorted(
            (s for s in self.sweeps.values() if s.visible and (owner is None or s.owner == owner)),
            key=lambda s: (s.pb.created_unix_ms, s.sweep_id),
            reverse=True,
        )
        return sweeps[:limit] if limit else sweeps

    async def create(
        self,
        request: finetune_pb2.CreateSweepRequest,
        trace_carrier: dict[str, str] | None = None,
        owner: str = "",
    ) -> Sweep:
        """Validates the sweep, launches its first trial (the job manager's CreateJob
        checks the base job, dataset included, before the sweep is written), and
        returns it RUNNING."""
        token_key = (owner, request.client_token)
        if request.client_token and token_key in self._by_token:
            return self.sweeps[self._by_token[token_key]]
        spec = sweep_spec_from_pb(request)
        base = request.base
        try:
            validate_name(base.output_name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"base.output_name: {exc}") from None
        plan = plan_trials(spec)
        async with self._create_lock:
            if request.client_token and token_key in self._by_token:
                return self.sweeps[self._by_token[token_key]]
            sweep_id = f"sw-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            longest = trial_output_name(base.output_name, sweep_id, len(plan))
            if len(longest) > 64:
                raise InvalidArgument(
                    f"base.output_name {base.output_name!r} is too long for a sweep: trial "
                    f"adapters are named like {longest!r} (at most 64 characters)"
                )
            trials = []
            for number, params in enumerate(plan, start=1):
                hp = finetune_pb2.Hyperparameters(**params)  # type: ignore[arg-type]
                merged = finetune_pb2.Hyperparameters()
                merged.CopyFrom(base.hyperparameters)
                merged.MergeFrom(hp)
                # Every trial's values checked now, with the job manager's rules.
                config = hyperparameters_to_config(METHOD_NAMES.get(base.method, "lora"), merged)
                if config.eval_fraction <= 0:
                    raise InvalidArgument(
                        "base.hyperparameters.eval_fraction must be > 0: the objective is "
                        "the eval loss"
                    )
                self.jobs.job_nproc(base.nproc, config.batch_size)
                trials.append(
                    finetune_pb2.Trial(number=number, params=hp, state=finetune_pb2.QUEUED)
                )
            carrier = dict(trace_carrier or {})
            pb = finetune_pb2.Sweep(
                sweep_id=sweep_id,
                state=finetune_pb2.RUNNING,
                output_name=base.output_name,
                strategy={
                    "grid": finetune_pb2.GRID,
                    "random": finetune_pb2.RANDOM,
                    "tpe": finetune_pb2.TPE,
                }[spec.strategy],
                planned_trials=len(plan),
                parallelism=spec.parallelism,
                objective=spec.objective,
                trials=trials,
                created_unix_ms=now_ms(),
                client_token=request.client_token,
            )
            tmp = self.sweeps_dir / f".{sweep_id}.tmp"
            tmp.mkdir(parents=True)
            sweep = Sweep(
                dir=tmp,
                pb=pb,
                plan=plan,
                owner=owner,
                traceparent=carrier.get("traceparent", ""),
            )
            try:
                (tmp / REQUEST_FILE).write_text(json_format.MessageToJson(request, indent=None))
                first = sweep.pb.trials[0]
                self._choose(sweep, first, request)
                # The first trial's job checks the base request (dataset, model, method)
                # with the job manager's own rules; a refusal leaves nothing behind.
                job = await self.jobs.create(
                    self._trial_request(sweep, first, request), carrier or None, owner=owner
                )
                first.job_id = job.job_id
                first.state = job.pb.state
                self._save(sweep)
                os.replace(tmp, self.sweeps_dir / sweep_id)
                sweep.dir = self.sweeps_dir / sweep_id
                self._claim(sweep)  # a new folder: nobody else can hold it
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.sweeps[sweep_id] = sweep
            if request.client_token:
                self._by_token[token_key] = sweep_id
        await self._record(sweep, f"sweep created: {len(plan)} {spec.strategy} trial(s)")
        await self._record(sweep, f"trial 1 launched as job {first.job_id}", first)
        logger.info(
            "sweep %s: %d %s trial(s) of %s, %d at a time",
            sweep_id,
            len(plan),
            spec.strategy,
            base.output_name,
            spec.parallelism,
        )
        self._wake.set()
        return sweep

    async def cancel(self, sweep_id: str, owner: str | None = None) -> Sweep:
        """Launches no more trials and cancels the trials' running jobs; the sweep ends
        CANCELLED once they have stopped (within a training step)."""
        sweep = self.get(sweep_id, owner)
        if sweep.terminal:
            return sweep
        sweep.cancel_requested = True
        for trial in sweep.pb.trials:
            if trial.job_id and trial.state not in TERMINAL_STATES:
                job = self.jobs.jobs.get(trial.job_id)
                if job is not None and not job.terminal:
                    await self.jobs.cancel(trial.job_id)
        await self._record(sweep, "cancel requested")
        self._wake.set()
        return sweep

    async def watch(
        self, sweep_id: str, from_sequence: int = 0, owner: str | None = None
    ) -> AsyncIterator[finetune_pb2.SweepEvent]:
        """Past events from ``from_sequence``, then live ones until the sweep ends."""
        sweep = self.get(sweep_id, owner)
        async for event in follow_events(sweep, self._condition(sweep), from_sequence):
            yield event

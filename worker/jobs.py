"""Fine-tuning jobs on a worker: validation, a FIFO queue, one training process per job,
persistent state and events, watchers, cancel, idempotency and crash recovery.

On disk, one folder per job under ``jobs_dir``::

    <job_id>/job.json       the Job (protobuf JSON), the request, the run spec, bookkeeping
    <job_id>/data.jsonl     the dataset, normalised to JSONL
    <job_id>/eval.jsonl     the separate eval dataset, when the request has one
    <job_id>/events.jsonl   append-only JobEvents (protobuf JSON), sequence numbers from 1
    <job_id>/progress.jsonl what the training process reports (JobEvents without sequence)
    <job_id>/process.log    the training process's stdout/stderr
    <job_id>/cancel         present once CancelJob was called
    <job_id>/lease.<epoch>  who holds the job (common/job_lease.py); the highest epoch counts
    <job_id>/work/          checkpoints and the exported artifact

Only the manager holding a job's lease writes its ``job.json`` and ``events.jsonl``; the
training process (:mod:`trainer.job_process`) only appends to ``progress.jsonl``, which
that manager tails. A file (not a pipe) carries progress so that events a process wrote
while the worker was down are still read after a restart.

Many workers may share ``jobs_dir`` (docker-compose's one volume, a ReadWriteMany
claim). The worker that creates a job claims its lease (epoch 1) and renews it while
it holds the job, finished or not; the other workers mirror the job from disk (GetJob,
ListJobs and WatchJob work on any of them) and take it over only when its lease is
released or expired (see common/job_lease.py: expiry is judged on the observer's own
clock), by claiming the next epoch: exactly one claim of an epoch wins. A takeover of
a job that was RUNNING resumes it from its last checkpoint; every change of holder is
a ``log`` event starting with ``lease holder:``. A worker that finds its lease taken
stops its training process, which is fenced by its epoch too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from google.protobuf import json_format

from common import job_lease
from common.config import home_dir
from common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from common.model_store import validate_name
from common.pb import finetune_pb2
from common.tracing import context_from_dict, inject_to_dict, subprocess_env
from common.validation import job_nproc
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig
from trainer.data import DatasetError, JsonlText, TrainEval, parse_jsonl_text, prepare_data
from trainer.distributed import TORCHRUN_ENV
from trainer.job_process import DATA_FILE, EVAL_DATA_FILE, EXIT_LEASE_LOST

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
PROGRESS_FILE = "progress.jsonl"
CANCEL_FILE = "cancel"
PROCESS_LOG = "process.log"
WORK_DIR = "work"
LEASE_HOLDER_LOG = "lease holder:"  # prefix of the log events that name a new holder

TERMINAL_STATES = frozenset({finetune_pb2.SUCCEEDED, finetune_pb2.FAILED, finetune_pb2.CANCELLED})
METHOD_NAMES = {
    finetune_pb2.METHOD_UNSPECIFIED: "lora",
    finetune_pb2.LORA: "lora",
    finetune_pb2.FULL: "full",
    finetune_pb2.PROMPT_TUNING: "prompt_tuning",
    finetune_pb2.BOTTLENECK: "bottleneck",
}
_METHOD_ENUMS = {"lora": finetune_pb2.LORA, "full": finetune_pb2.FULL}
_METHOD_ENUMS["prompt_tuning"] = finetune_pb2.PROMPT_TUNING
_METHOD_ENUMS["bottleneck"] = finetune_pb2.BOTTLENECK
# Scalar Hyperparameters fields that map one to one onto TrainConfig fields.
_HP_SCALARS = (
    "epochs",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "eval_fraction",
    "seed",
    "checkpoint_every_steps",
    "num_virtual_tokens",
    "bottleneck_size",
    "max_steps",
    "drop_invalid",
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _dump(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@dataclass
class JobsConfig:
    """What the manager needs from the worker's configuration."""

    jobs_dir: Path
    store_dir: str  # "" = the store's default root
    data_dir: Path
    max_concurrent_jobs: int = 1
    job_threads: int = 1
    nproc: int = 1  # ranks of a job whose request leaves nproc unset
    model_spec: str = ""  # the worker's --model ("" = default), passed to the trainer
    device: str = "auto"
    worker_id: str = ""
    max_attempts: int = 3  # process starts per job (restarts after crashes included)
    cancel_grace_s: float = 60.0  # after this, a cancelled process that still runs is killed
    poll_interval_s: float = 0.2
    lease_s: float = 15.0  # a job whose lease is not renewed for this long is taken over

    @property
    def scan_interval_s(self) -> float:
        """Period of the shared-store scan (new jobs, mirrors, expired leases)."""
        return max(self.poll_interval_s, min(2.0, self.lease_s / 3))


def hyperparameters_to_config(method: str, hp: finetune_pb2.Hyperparameters) -> TrainConfig:
    """TrainConfig from the request's Hyperparameters (unset fields take the defaults);
    a bad value raises InvalidArgument naming the field."""
    values: dict[str, Any] = {"method": method}
    for name in _HP_SCALARS:
        if hp.HasField(name):
            values[name] = getattr(hp, name)
    if hp.lr_scheduler:
        values["lr_scheduler"] = hp.lr_scheduler
    if hp.bottleneck_placement:
        values["bottleneck_placement"] = hp.bottleneck_placement
    if hp.lora_target_modules:
        values["lora_target_modules"] = list(hp.lora_target_modules)
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        raise InvalidArgument(f"hyperparameters: {exc}") from None


def config_to_hyperparameters(config: TrainConfig) -> finetune_pb2.Hyperparameters:
    """The effective hyperparameters, every field filled (Job.hyperparameters)."""
    hp = finetune_pb2.Hyperparameters(
        lr_scheduler=config.lr_scheduler,
        lora_target_modules=config.lora_target_modules,
        bottleneck_placement=config.bottleneck_placement,
    )
    for name in _HP_SCALARS:
        setattr(hp, name, getattr(config, name))
    return hp


def examples_to_rows(examples: Any) -> list[dict[str, Any]]:
    """Inline Example messages as the row dicts trainer.data reads (unset fields left out)."""
    rows = []
    for ex in examples:
        row: dict[str, Any] = {}
        if ex.prompt or ex.completion:
            row.update(prompt=ex.prompt, completion=ex.completion)
        if ex.messages:
            row["messages"] = [{"role": m.role, "content": m.content} for m in ex.messages]
        if ex.text:
            row["text"] = ex.text
        rows.append(row)
    return rows


@dataclass
class Job:
    """One job in memory: the protobuf view, its events, and the run bookkeeping."""

    dir: Path
    pb: finetune_pb2.Job
    request: dict[str, Any]  # the CreateJobRequest as JSON, dataset fields removed
    run: dict[str, Any]  # what the training process reads: config, model, store, resume
    events: list[finetune_pb2.JobEvent] = field(default_factory=list)
    progress_offset: int = 0  # bytes of progress.jsonl already turned into events
    attempts: int = 0
    pid: int | None = None
    cancel_requested: bool = False
    process: subprocess.Popen[bytes] | None = None
    changed: asyncio.Condition | None = None
    cancel_sent_monotonic: float | None = None
    owner: str = ""  # tenant that created it (router --auth-file); "" = no tenant
    # The lease epoch this manager holds (0 = another worker's job, mirrored from disk).
    lease_epoch: int = 0
    events_offset: int = 0  # bytes of events.jsonl a mirror has read

    @property
    def job_id(self) -> str:
        return self.pb.job_id

    @property
    def held(self) -> bool:
        return self.lease_epoch > 0

    @property
    def terminal(self) -> bool:
        return self.pb.state in TERMINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "job": _dump(self.pb),
            "request": self.request,
            "run": self.run,
            "progress_offset": self.progress_offset,
            "attempts": self.attempts,
            "pid": self.pid,
            "cancel_requested": self.cancel_requested,
            "owner": self.owner,
        }


class JobManager:
    """Owns every job of this worker. All methods run on the worker's event loop; file
    I/O is small (a few lines per training step) so it stays inline."""

    def __init__(self, config: JobsConfig, metrics: Any = None) -> None:
        self.config = config
        self._metrics = metrics  # common.metrics.WorkerMetrics (jobs by state, loss)
        self.jobs: dict[str, Job] = {}
        # (owner, client_token) -> job id: a token is idempotent within its tenant only.
        self._by_token: dict[tuple[str, str], str] = {}
        self._runtime: Any = None  # worker.runtime.ModelRuntime once loaded
        self._create_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # set by create/cancel: run the loop now
        # Called with the number of live training processes whenever it changes: the
        # worker hands their cores over from its engine (worker/server.py).
        self.on_training_processes: Callable[[int], None] | None = None
        self._training_processes = 0
        # Leases: this process's incarnation tells its own claims from those of an earlier
        # process with the same worker id; the keeper renews what it holds.
        self._incarnation = uuid.uuid4().hex
        self._keeper = job_lease.LeaseKeeper(config.lease_s)
        self._observer = job_lease.LeaseObserver()
        self._next_scan = 0.0
        config.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._load_new()
        if self.jobs:
            logger.info(
                "loaded %d fine-tuning job(s) from %s", len(self.jobs), self.config.jobs_dir
            )

    # ------------------------------------------------------------ persistence

    def _load_new(self) -> None:
        """Reads job folders not loaded yet (at start: GetJob/ListJobs work even before
        the model is loaded; later: jobs other workers created on a shared store)."""
        for job_file in sorted(self.config.jobs_dir.glob(f"*/{JOB_FILE}")):
            if job_file.parent.name.startswith(".") or job_file.parent.name in self.jobs:
                continue  # a job being created (tmp folder), or known
            try:
                job = self._read_job(job_file.parent)
            except (OSError, ValueError, KeyError, json_format.ParseError) as exc:
                logger.error("skipping unreadable job folder %s: %s", job_file.parent, exc)
                continue
            self.jobs[job.job_id] = job
            if job.pb.client_token:
                self._by_token[(job.owner, job.pb.client_token)] = job.job_id

    def _read_job(self, job_dir: Path) -> Job:
        raw = json.loads((job_dir / JOB_FILE).read_text())
        job = Job(dir=job_dir, pb=finetune_pb2.Job(), request={}, run={})
        self._apply_job_json(job, raw)
        job.events, job.events_offset = self._read_events(job.dir / EVENTS_FILE)
        return job

    @staticmethod
    def _apply_job_json(job: Job, raw: dict[str, Any]) -> None:
        job.pb = json_format.ParseDict(raw["job"], finetune_pb2.Job())
        job.request = raw.get("request", {})
        job.run = raw.get("run", {})
        job.progress_offset = int(raw.get("progress_offset", 0))
        job.attempts = int(raw.get("attempts", 0))
        job.pid = raw.get("pid")
        job.cancel_requested = bool(raw.get("cancel_requested", False))
        job.owner = str(raw.get("owner", ""))

    @staticmethod
    def _read_events(path: Path, offset: int = 0) -> tuple[list[finetune_pb2.JobEvent], int]:
        """The complete event lines of ``path`` from byte ``offset``, and the offset
        after them (a line still being appended by the job's holder is left for later)."""
        events: list[finetune_pb2.JobEvent] = []
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return events, offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                events.append(json_format.Parse(line.decode("utf-8"), finetune_pb2.JobEvent()))
            except (json_format.ParseError, UnicodeDecodeError):
                # A crash mid-append leaves a torn line; skip it.
                logger.warning("skipping torn event line in %s", path)
        return events, offset + end

    async def _refresh(self, job: Job) -> None:
        """Brings a job another worker holds up to date from its folder."""
        try:
            raw = json.loads((job.dir / JOB_FILE).read_text())
        except (OSError, ValueError) as exc:
            logger.warning("job %s: cannot re-read %s: %s", job.job_id, JOB_FILE, exc)
            return
        # job.json first: its holder appends events before saving it, so the events
        # read after it are at least as new.
        self._apply_job_json(job, raw)
        new, job.events_offset = self._read_events(job.dir / EVENTS_FILE, job.events_offset)
        job.events.extend(new)
        if new:
            await self._notify(job)

    def _save(self, job: Job) -> None:
        """Rewrites job.json atomically (tmp + rename: never half a file); a finished job's
        lease is released after its last save."""
        if not job.held:
            raise RuntimeError(f"job {job.job_id}: written by a worker not holding its lease")
        tmp = job.dir / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(job.to_json(), indent=1))
        os.replace(tmp, job.dir / JOB_FILE)
        if job.terminal and job.process is None:
            self._keeper.release(job.job_id)
            job.lease_epoch = 0

    def _condition(self, job: Job) -> asyncio.Condition:
        if job.changed is None:
            job.changed = asyncio.Condition()
        return job.changed

    async def _notify(self, job: Job) -> None:
        cond = self._condition(job)
        async with cond:
            cond.notify_all()

    def _append(self, job: Job, event: finetune_pb2.JobEvent) -> None:
        """Numbers an event, applies it to the Job, appends it to events.jsonl."""
        if not job.held:
            raise RuntimeError(f"job {job.job_id}: written by a worker not holding its lease")
        event.job_id = job.job_id
        event.sequence = len(job.events) + 1
        if not event.time_unix_ms:
            event.time_unix_ms = now_ms()
        self._apply(job, event)
        job.events.append(event)
        if self._metrics is not None and event.WhichOneof("event") == "metrics":
            self._metrics.set_training_loss(job.job_id, event.metrics.loss)
        line = (json_format.MessageToJson(event, indent=None) + "\n").encode("utf-8")
        with open(job.dir / EVENTS_FILE, "ab") as fh:
            fh.write(line)
        job.events_offset += len(line)

    def _apply(self, job: Job, event: finetune_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        pb = job.pb
        if kind == "metrics":
            pb.latest_metrics.CopyFrom(event.metrics)
        elif kind == "evaluation":
            if event.evaluation.stage == "before":
                pb.eval_before.CopyFrom(event.evaluation)
            elif event.evaluation.stage == "after":
                pb.eval_after.CopyFrom(event.evaluation)
        elif kind == "artifact":
            pb.artifact.CopyFrom(event.artifact)
        elif kind == "state_change":
            pb.state = event.state_change.state
            if pb.state == finetune_pb2.RUNNING and not pb.started_unix_ms:
                pb.started_unix_ms = event.time_unix_ms
            if pb.state in TERMINAL_STATES:
                pb.finished_unix_ms = event.time_unix_ms
            if pb.state == finetune_pb2.FAILED:
                pb.error = event.state_change.message

    async def _record(self, job: Job, *events: finetune_pb2.JobEvent) -> None:
        for event in events:
            self._append(job, event)
        self._save(job)
        await self._notify(job)

    @staticmethod
    def _state_event(state: int, message: str = "") -> finetune_pb2.JobEvent:
        return finetune_pb2.JobEvent(
            state_change=finetune_pb2.StateChange(state=state, message=message)  # type: ignore[arg-type]
        )

    @staticmethod
    def _log_event(message: str) -> finetune_pb2.JobEvent:
        return finetune_pb2.JobEvent(log=message)

    # ------------------------------------------------------------ life cycle

    def attach_runtime(self, runtime: Any) -> None:
        """Called once the model is loaded: CreateJob needs its name and tokenizer."""
        self._runtime = runtime

    async def start(self) -> None:
        """Takes over jobs cut off by a crash (their lease released, expired, or left by
        this worker's previous process), then starts the queue/tail/scan loop."""
        self._keeper.start()
        await self._scan(at_start=True)
        self._task = asyncio.create_task(self._loop(), name="finetune-jobs")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the loop and interrupts running jobs; they stay RUNNING in job.json and
        their leases are released, so this worker on restart, or another one sharing the
        store at once, resumes them from their last checkpoint."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in list(self.jobs.values()):
            if job.process is None or job.process.poll() is not None or not job.held:
                continue
            self._drain_progress(job)
            if job.terminal:
                continue
            _signal_group(job.process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(job.process.wait, timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(job.process.pid, signal.SIGKILL)
            self._drain_progress(job)
            if not job.terminal:
                await self._record(
                    job,
                    self._log_event(
                        f"worker {self.config.worker_id} shutting down: job interrupted; "
                        "the next worker to hold it (this one restarted, or another one "
                        "on a shared store) resumes it"
                    ),
                )
        self._keeper.stop()
        for job in self.jobs.values():
            if job.held:
                self._keeper.release(job.job_id)
                job.lease_epoch = 0

    def _ordered(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: (j.pb.created_unix_ms, j.job_id))

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
                if time.monotonic() >= self._next_scan:
                    await self._scan()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive any one job's failure
                logger.exception("fine-tuning job loop error")
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self) -> None:
        await self._check_leases()
        if self._metrics is not None:
            counts: dict[str, int] = {}
            for j in self.jobs.values():
                if not (j.held or j.pb.worker_id == self.config.worker_id):
                    continue  # another worker's job: that worker counts it
                name = finetune_pb2.JobState.Name(j.pb.state)  # type: ignore[arg-type]
                counts[name] = counts.get(name, 0) + 1
            self._metrics.set_jobs_by_state(counts)
        running = 0
        for job in self._ordered():
            if job.process is not None:
                await self._poll(job)
                if job.process is not None:
                    running += 1
        # FIFO: the oldest QUEUED jobs this worker holds take the free slots.
        for job in self._ordered():
            if running >= self.config.max_concurrent_jobs or self._stopping:
                break
            if job.held and job.pb.state == finetune_pb2.QUEUED and not job.cancel_requested:
                await self._spawn(job)
                if job.process is not None:
                    running += 1
        if running != self._training_processes:
            self._training_processes = running
            if self.on_training_processes is not None:
                self.on_training_processes(running)

    # ------------------------------------------------------------ leases

    async def _check_leases(self) -> None:
        """Gives up jobs whose lease another worker took; acts on cancels that another
        worker (which cannot write a job it does not hold) left as the cancel file."""
        lost = set(self._keeper.take_lost())
        for job in list(self.jobs.values()):
            if not job.held:
                continue
            if job.job_id in lost or job_lease.current_epoch(job.dir) != job.lease_epoch:
                await self._lose(job, "its lease was taken over or could not be renewed")
            elif not job.cancel_requested and not job.terminal and (job.dir / CANCEL_FILE).exists():
                await self.cancel(job.job_id)

    async def _lose(self, job: Job, why: str) -> None:
        """This worker no longer holds ``job``: stop its training process (fenced, it
        could write nothing more anyway) and mirror the job from disk from now on."""
        logger.warning("job %s: lease lost (%s); stopping its training process", job.job_id, why)
        self._keeper.drop(job.job_id)
        job.lease_epoch = 0
        if job.process is not None:
            _signal_group(job.process.pid, signal.SIGKILL)
            try:
                await asyncio.to_thread(job.process.wait, 10.0)
            except subprocess.TimeoutExpired:
                logger.error("job %s: process %d did not exit", job.job_id, job.process.pid)
            job.process = None
            job.pid = None
            if self._metrics is not None:
                self._metrics.clear_job(job.job_id)
        await self._refresh(job)

    async def _scan(self, at_start: bool = False) -> None:
        """The shared-store pass: new job folders, mirrors brought up to date, and the
        jobs whose lease is released or expired (or that never had one) taken over; at
        start also those this worker id held in its previous process."""
        self._next_scan = time.monotonic() + self.config.scan_interval_s
        self._load_new()
        for job in self._ordered():
            if job.held or job.terminal:
                continue  # a terminal job never changes again
            await self._refresh(job)
            if job.terminal or self._stopping:
                self._observer.forget(job.job_id)
                continue
            await self._maybe_take_over(job, at_start)

    async def _maybe_take_over(self, job: Job, at_start: bool) -> None:
        me, incarnation = self.config.worker_id, self._incarnation
        try:
            lease = job_lease.read_current(job.dir, self.config.lease_s)
        except OSError as exc:
            logger.warning("job %s: lease unreadable, judged next scan: %s", job.job_id, exc)
            return
        if lease is None:
            reason = "it had no lease"  # a job from before leases
        elif at_start and lease.worker_id == me and lease.incarnation != incarnation:
            # Worker ids are unique, so that was this worker's previous process: no need
            # to wait for its lease to expire. Only at start: two live processes that
            # were wrongly given one id must not take a job from each other at every scan.
            reason = "this worker restarted"
        elif lease.released:
            reason = f"worker {lease.worker_id} released it"
        elif self._observer.expired(job.job_id, lease):
            reason = f"the lease of worker {lease.worker_id} expired ({lease.lease_s:g} s)"
        else:
            return
        epoch = (lease.epoch if lease else 0) + 1
        claimed = job_lease.try_claim(job.dir, epoch, me, incarnation, self.config.lease_s)
        if claimed is None:
            logger.info("job %s: another worker claimed lease epoch %d first", job.job_id, epoch)
            return
        self._observer.forget(job.job_id)
        self._keeper.hold(job.job_id, job.dir, claimed)
        job.lease_epoch = epoch
        await self._refresh(job)  # what the previous holder wrote up to its last moment
        if job.terminal:  # it finished just before its lease ran out
            self._keeper.release(job.job_id)
            job.lease_epoch = 0
            return
        previous = f" from worker {lease.worker_id}" if lease else ""
        note = (
            f"{LEASE_HOLDER_LOG} worker {me} took the job over{previous} (epoch {epoch}): {reason}"
        )
        logger.warning("job %s: %s", job.job_id, note)
        job.pb.worker_id = me
        job.run["worker_id"] = me  # the artifact's metadata names the worker that ran it
        if (job.dir / CANCEL_FILE).exists():
            job.cancel_requested = True
        await self._record(job, self._log_event(note))
        if job.pb.state == finetune_pb2.RUNNING:
            await self._recover(job)
        elif job.cancel_requested:
            await self._record(job, self._state_event(finetune_pb2.CANCELLED, "cancelled"))
        self._wake.set()

    # ------------------------------------------------------------ processes

    async def _spawn(self, job: Job) -> None:
        if job.attempts >= self.config.max_attempts:
            await self._record(
                job,
                self._state_event(
                    finetune_pb2.FAILED,
                    f"training process started {job.attempts} times without finishing",
                ),
            )
            return
        job.attempts += 1
        ctx = context_from_dict(
            {"traceparent": job.run["traceparent"]} if job.run.get("traceparent") else None
        )
        env = {
            # Not torchrun's variables of a worker started under torchrun: the job's
            # process launches its own ranks (trainer.distributed).
            **{k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV},
            **subprocess_env(ctx=ctx),
            # Few threads: the worker's engine keeps the cores it needs to keep serving.
            "OMP_NUM_THREADS": str(self.config.job_threads),
            "MKL_NUM_THREADS": str(self.config.job_threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        log = open(job.dir / PROCESS_LOG, "ab")  # noqa: SIM115 - the child owns it now
        try:
            job.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainer.job_process",
                    "--job-dir",
                    str(job.dir),
                    "--lease-epoch",
                    str(job.lease_epoch),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own group: signals to the worker's group miss it
            )
        finally:
            log.close()
        job.pid = job.process.pid
        logger.info(
            "job %s: training process %d started (attempt %d)", job.job_id, job.pid, job.attempts
        )
        await self._record(job, self._state_event(finetune_pb2.RUNNING, f"attempt {job.attempts}"))

    def _drain_progress(self, job: Job) -> bool:
        """Turns new complete lines of progress.jsonl into events; True if any."""
        path = job.dir / PROGRESS_FILE
        try:
            with open(path, "rb") as fh:
                fh.seek(job.progress_offset)
                data = fh.read()
        except FileNotFoundError:
            return False
        end = data.rfind(b"\n")
        if end < 0:
            return False  # only a partial line so far
        got = False
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                event = json_format.Parse(line.decode("utf-8"), finetune_pb2.JobEvent())
            except (json_format.ParseError, UnicodeDecodeError) as exc:
                logger.warning("job %s: bad progress line skipped: %s", job.job_id, exc)
                continue
            if job.terminal:
                break  # nothing may follow a terminal state
            self._append(job, event)
            got = True
        job.progress_offset += end + 1
        self._save(job)
        return got

    async def _poll(self, job: Job) -> None:
        assert job.process is not None
        got = self._drain_progress(job)
        code = job.process.poll()
        if code is None:
            if (
                job.cancel_requested
                and job.cancel_sent_monotonic is not None
                and time.monotonic() - job.cancel_sent_monotonic > self.config.cancel_grace_s
            ):
                _signal_group(job.process.pid, signal.SIGKILL)
            if got:
                await self._notify(job)
            return
        if code == EXIT_LEASE_LOST:
            job.process = None  # it exited: nothing to stop
            job.pid = None
            await self._lose(job, "its training process found the lease epoch replaced")
            return
        self._drain_progress(job)  # what it wrote just before exiting
        if self._metrics is not None:
            self._metrics.clear_job(job.job_id)
        job.process = None
        job.pid = None
        if not job.terminal:
            if job.cancel_requested:
                self._append(job, self._state_event(finetune_pb2.CANCELLED, "cancelled"))
            else:
                self._append(
                    job,
                    self._state_event(
                        finetune_pb2.FAILED,
                        f"training process exited with {_describe_exit(code)} without "
                        f"finishing; see {job.dir / PROCESS_LOG}",
                    ),
                )
        self._save(job)
        await self._notify(job)
        logger.info(
            "job %s: %s",
            job.job_id,
            finetune_pb2.JobState.Name(job.pb.state),  # type: ignore[arg-type]
        )

    async def _recover(self, job: Job) -> None:
        """A RUNNING job just taken over: its worker died (or stopped, or lost touch).
        Read what its process wrote, stop a leftover process this host can see, then
        resume from the last checkpoint (or from the start when there is none yet) —
        never leave it RUNNING with no process."""
        self._drain_progress(job)
        if job.terminal:
            await self._notify(job)
            return
        if job.pid and _is_job_process(job.pid, job.dir):
            _signal_group(job.pid, signal.SIGKILL)
            for _ in range(50):
                if not _is_job_process(job.pid, job.dir):
                    break
                await asyncio.sleep(0.1)
            self._drain_progress(job)
            if job.terminal:
                return
        job.pid = None
        if job.cancel_requested:
            await self._record(job, self._state_event(finetune_pb2.CANCELLED, "cancelled"))
            return
        ckpt = latest_checkpoint(job.dir / WORK_DIR / "checkpoints")
        if ckpt is not None:
            step = int(ckpt.name.split("-")[-1])
            job.run["resume_from"] = str(ckpt)
            note = f"training process was gone; resuming from checkpoint at step {step}"
        else:
            job.run.pop("resume_from", None)
            note = (
                "training process was gone and no checkpoint exists; restarting from the beginning"
            )
        logger.warning("job %s: %s", job.job_id, note)
        await self._record(
            job,
            self._log_event(note),
            self._state_event(finetune_pb2.QUEUED, f"re-queued by worker {self.config.worker_id}"),
        )

    # ------------------------------------------------------------ API

    def _require_runtime(self) -> Any:
        if self._runtime is None:
            raise Unavailable("worker is still loading its model")
        return self._runtime

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, or NotFound; with ``owner`` (the caller's tenant) another tenant's
        job is NotFound too, with the same message: its existence is not revealed."""
        job = self.jobs.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound(f"job {job_id!r} not found on worker {self.config.worker_id}")
        return job

    def to_pb(self, job: Job) -> finetune_pb2.Job:
        out = finetune_pb2.Job()
        out.CopyFrom(job.pb)
        if not out.worker_id:  # a job from before leases named no holder
            out.worker_id = self.config.worker_id
        return out

    def list(self, state: int = 0, limit: int = 0, owner: str | None = None) -> list[Job]:
        """Jobs newest first, optionally of one state, of one owner and at most ``limit``."""
        jobs = [
            j
            for j in reversed(self._ordered())
            if (not state or j.pb.state == state) and (owner is None or j.owner == owner)
        ]
        return jobs[:limit] if limit else jobs

    async def create(
        self,
        request: finetune_pb2.CreateJobRequest,
        trace_carrier: dict[str, str] | None = None,
        owner: str = "",
    ) -> Job:
        """Validates the whole request, writes the job folder and queues the job (owned
        by the tenant ``owner``).

        Every check runs before anything is written, so a bad request leaves no trace (and
        nothing in the model store: only a finished job publishes)."""
        token_key = (owner, request.client_token)
        if request.client_token and token_key in self._by_token:
            return self.jobs[self._by_token[token_key]]
        runtime = self._require_runtime()
        source = runtime.source
        if request.base_model and request.base_model not in (source.name, source.path):
            raise InvalidArgument(
                f"base_model {request.base_model!r} is unknown on this worker "
                f"(it trains {source.name!r})"
            )
        if request.method not in METHOD_NAMES:
            raise InvalidArgument(f"method {request.method} is not a known Method")
        method = METHOD_NAMES[request.method]
        try:
            validate_name(request.output_name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"output_name: {exc}") from None
        config = hyperparameters_to_config(method, request.hyperparameters)
        nproc = self.job_nproc(request.nproc, config.batch_size)
        dataset_text = self._dataset_text(request)
        eval_text = self._dataset_text(request, eval_dataset=True)
        # JSONL is prepared as text, so that errors and dropped rows name its lines.
        rows: Any = _dataset_rows(dataset_text, bool(request.examples))
        if eval_text is not None:
            rows = TrainEval(rows, _dataset_rows(eval_text, bool(request.eval_examples)))
        try:
            prepared = await asyncio.to_thread(
                lambda: prepare_data(
                    rows,
                    runtime.tokenizer,
                    max_seq_length=config.max_seq_length,
                    eval_fraction=config.eval_fraction,
                    seed=config.seed,
                    drop_invalid=config.drop_invalid,
                )
            )
        except DatasetError as exc:
            # An eval dataset's errors say so themselves ("eval dataset line 3: ...").
            raise InvalidArgument(str(exc) if exc.eval_dataset else f"dataset: {exc}") from None

        async with self._create_lock:
            # A concurrent call with the same token may have won while we validated.
            if request.client_token and token_key in self._by_token:
                return self.jobs[self._by_token[token_key]]
            job_id = f"ft-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            job_dir = self.config.jobs_dir / job_id
            tmp = self.config.jobs_dir / f".{job_id}.tmp"
            tmp.mkdir(parents=True)
            try:
                (tmp / DATA_FILE).write_text(dataset_text, encoding="utf-8")
                if eval_text is not None:
                    (tmp / EVAL_DATA_FILE).write_text(eval_text, encoding="utf-8")
                carrier = dict(trace_carrier or inject_to_dict())
                traceparent = carrier.get("traceparent", "")
                stored = finetune_pb2.CreateJobRequest()
                stored.CopyFrom(request)
                stored.ClearField("examples")
                stored.dataset_jsonl = ""
                stored.ClearField("eval_examples")
                stored.eval_dataset_jsonl = ""
                pb = finetune_pb2.Job(
                    job_id=job_id,
                    state=finetune_pb2.QUEUED,
                    base_model=source.name,
                    method=_METHOD_ENUMS[method],
                    output_name=request.output_name,
                    hyperparameters=config_to_hyperparameters(config),
                    created_unix_ms=now_ms(),
                    client_token=request.client_token,
                    trace_id=traceparent.split("-")[1] if traceparent.count("-") >= 3 else "",
                    train_examples=prepared.stats.train,
                    eval_examples=prepared.stats.eval,
                    worker_id=self.config.worker_id,
                    dataset_report=prepared.stats.to_pb(),
                )
                job = Job(
                    dir=job_dir,
                    pb=pb,
                    request=_dump(stored),
                    run={
                        "config": config.to_dict(),
                        "model": self.config.model_spec,
                        "device": self.config.device,
                        "store_dir": self.config.store_dir,
                        "threads": self.config.job_threads,
                        "nproc": nproc,
                        "output_name": request.output_name,
                        "traceparent": traceparent,
                        "worker_id": self.config.worker_id,
                    },
                    owner=owner,
                )
                job.dir = tmp
                # Claimed before the folder appears: no other worker sees it unclaimed.
                lease = job_lease.try_claim(
                    tmp, 1, self.config.worker_id, self._incarnation, self.config.lease_s
                )
                assert lease is not None, "a fresh folder has no lease"
                job.lease_epoch = 1
                self._append(job, self._state_event(finetune_pb2.QUEUED, "queued"))
                self._append(job, self._log_event(f"dataset validated: {prepared.stats.summary()}"))
                self._append(job, self._log_event(f"dataset: {prepared.stats.balance_summary()}"))
                self._append(
                    job,
                    self._log_event(
                        f"{LEASE_HOLDER_LOG} worker {self.config.worker_id} holds the job (epoch 1)"
                    ),
                )
                self._save(job)
                os.replace(tmp, job_dir)  # the job appears whole or not at all
                job.dir = job_dir
                self._keeper.hold(job_id, job_dir, lease)
            except BaseException:
                job.lease_epoch = 0
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.jobs[job_id] = job
            if request.client_token:
                self._by_token[token_key] = job_id
        logger.info(
            "job %s queued: %s %s -> %s (%d train / %d eval examples)",
            job_id,
            method,
            source.name,
            request.output_name,
            prepared.stats.train,
            prepared.stats.eval,
        )
        self._wake.set()  # start it now if a slot is free, not at the next poll
        return job

    def job_nproc(self, requested: int, batch_size: int) -> int:
        """A job's rank count (``requested``, else this worker's --nproc), checked against
        its batch size and this worker's cores (CPU) or CUDA devices; raises
        InvalidArgument naming nproc."""
        import torch

        from common.models import resolve_device

        if torch.device(resolve_device(self.config.device)).type == "cuda":
            available = torch.cuda.device_count()
        else:
            available = len(os.sched_getaffinity(0))
        return job_nproc(requested, self.config.nproc, available, batch_size)

    @overload
    def _dataset_text(
        self, request: finetune_pb2.CreateJobRequest, eval_dataset: Literal[False] = False
    ) -> str: ...

    @overload
    def _dataset_text(
        self, request: finetune_pb2.CreateJobRequest, eval_dataset: bool
    ) -> str | None: ...

    def _dataset_text(
        self, request: finetune_pb2.CreateJobRequest, eval_dataset: bool = False
    ) -> str | None:
        """The dataset (or with ``eval_dataset`` the optional eval dataset, None when
        not given) as JSONL text, from whichever of its three sources is set."""
        prefix, what = ("eval_", "eval dataset") if eval_dataset else ("", "dataset")
        examples = request.eval_examples if eval_dataset else request.examples
        jsonl = request.eval_dataset_jsonl if eval_dataset else request.dataset_jsonl
        dataset_name = request.eval_dataset_name if eval_dataset else request.dataset_name
        given = [
            name
            for name, present in (
                (f"{prefix}examples", len(examples) > 0),
                (f"{prefix}dataset_jsonl", bool(jsonl.strip())),
                (f"{prefix}dataset_name", bool(dataset_name)),
            )
            if present
        ]
        if not given:
            if eval_dataset:
                return None
            raise InvalidArgument(
                "dataset: empty; set one of examples, dataset_jsonl or dataset_name"
            )
        if len(given) > 1:
            raise InvalidArgument(f"{what}: set exactly one of {', '.join(given)}")
        if given[0].endswith("examples"):
            return "".join(json.dumps(r) + "\n" for r in examples_to_rows(examples))
        if given[0].endswith("dataset_jsonl"):
            return jsonl
        name = dataset_name.removesuffix(".jsonl")
        try:
            validate_name(name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{prefix}dataset_name: {exc}") from None
        path = self.config.data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise InvalidArgument(
                f"{prefix}dataset_name: no dataset {name!r} in {self.config.data_dir}"
            )
        return path.read_text(encoding="utf-8")

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Cancels a queued job at once, a running one within a training step. On a
        worker that does not hold the job it writes the cancel file, which the holder
        (and its training process) acts on within a poll."""
        job = self.get(job_id, owner)
        if job.terminal:
            if job.pb.state == finetune_pb2.CANCELLED:
                return job
            raise FailedPrecondition(
                f"job {job_id} already ended ({finetune_pb2.JobState.Name(job.pb.state)})"  # type: ignore[arg-type]
            )
        (job.dir / CANCEL_FILE).write_text(str(now_ms()))
        if not job.held:
            return job
        job.cancel_requested = True
        if job.process is None:
            await self._record(
                job, self._state_event(finetune_pb2.CANCELLED, "cancelled while queued")
            )
        else:
            job.cancel_sent_monotonic = time.monotonic()
            await self._record(
                job, self._log_event("cancel requested; stopping after the current step")
            )
        return job

    async def watch(
        self, job_id: str, from_sequence: int = 0, owner: str | None = None
    ) -> AsyncIterator[finetune_pb2.JobEvent]:
        """Past events from ``from_sequence``, then live ones until a terminal state."""
        job = self.get(job_id, owner)
        async for event in follow_events(job, self._condition(job), from_sequence):
            yield event


async def follow_events(
    record: Any, cond: asyncio.Condition, from_sequence: int = 0
) -> AsyncIterator[Any]:
    """``record.events`` from ``from_sequence`` (1-based), then each new one as ``cond`` is
    notified, until ``record.terminal`` (a job's or a sweep's watch)."""
    next_index = max(0, from_sequence - 1)
    while True:
        while next_index < len(record.events):
            yield record.events[next_index]
            next_index += 1
        if record.terminal:
            return
        async with cond:
            if next_index >= len(record.events) and not record.terminal:
                await cond.wait()


def _dataset_rows(text: str, inline_examples: bool) -> Any:
    """What prepare_data reads for a dataset's JSONL text: the text itself (errors name
    its lines), or for inline examples their rows (errors name "example N")."""
    return parse_dataset_rows(text, "example") if inline_examples else JsonlText(text)


def parse_dataset_rows(text: str, source: str) -> list[Any]:
    """Inline examples (normalised to JSONL text) as the list of rows prepare_data reads,
    so that its errors name "example N"."""
    return [row for _, row in parse_jsonl_text(text)]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _is_job_process(pid: int, job_dir: Path) -> bool:
    """True if ``pid`` is alive and is the training process of ``job_dir`` (not a reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"trainer.job_process" in cmdline and str(job_dir).encode() in cmdline


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def jobs_config_from_worker(config: Any) -> JobsConfig:
    """JobsConfig from a WorkerConfig (empty folders take their defaults under home)."""
    return JobsConfig(
        jobs_dir=Path(config.jobs_dir) if config.jobs_dir else home_dir() / "jobs",
        store_dir=config.store_dir,
        data_dir=Path(config.data_dir) if config.data_dir else home_dir() / "data",
        max_concurrent_jobs=config.max_concurrent_jobs,
        job_threads=config.job_threads,
        nproc=config.nproc,
        model_spec=config.model,
        device=config.device,
        worker_id=config.worker_id,
        lease_s=config.job_lease_s,
    )

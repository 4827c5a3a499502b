"""The training process of one worker job: ``python -m trainer.job_process --job-dir DIR``.

The worker's job manager (worker/jobs.py) writes ``DIR/job.json`` and ``DIR/data.jsonl``
(and ``DIR/eval.jsonl`` when the job has a separate eval dataset) and starts this
process in its own session. It trains with :func:`trainer.train` on
:func:`job_dataset`, publishes the artifact to the model store, and reports everything as
``llmcluster.v1.JobEvent`` JSON lines appended to ``DIR/progress.jsonl`` (no sequence
numbers: the manager numbers them). Its last line is a terminal ``state_change``.

It stops between steps when ``DIR/cancel`` appears, and exits on its own when the worker
that started it dies (the worker resumes the job from its last checkpoint on restart,
so two trainers never write the same job). It is fenced by the job's lease
(:mod:`common.job_lease`): started with ``--lease-epoch N``, it checks before each step,
each progress line, each checkpoint, the export and the publication that N is still
the job's current epoch, and exits with ``EXIT_LEASE_LOST`` (writing nothing more) once
another worker has taken the job over.

A job with ``run.nproc`` N > 1 trains data-parallel (:mod:`trainer.distributed`): this
process becomes the launcher of N rank processes (this same module, started with
torchrun's environment), in its process group, and exits with rank 0's code. Rank 0
does everything described above; the other ranks only train, and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from common.job_lease import LeaseFence, LeaseLost
from common.pb import finetune_pb2
from common.tracing import (
    ATTR_EPOCH,
    ATTR_JOB_ID,
    ATTR_JOB_METHOD,
    ATTR_LOSS,
    SERVICE_TRAINER,
    attached,
    context_from_env,
    current_traceparent,
    get_tracer,
    record_error,
    setup_tracing,
    shutdown_tracing,
)
from trainer.config import TrainConfig
from trainer.data import DatasetSource, TrainEval
from trainer.distributed import Ranks, launch
from trainer.events import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    TrainEvent,
)

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"
DATA_FILE = "data.jsonl"
EVAL_DATA_FILE = "eval.jsonl"  # present only when the job has a separate eval dataset
CANCEL_FILE = "cancel"
PUBLISHED_FILE = "published.json"
WORK_DIR = "work"
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_ORPHANED = 3
EXIT_LEASE_LOST = 4


def job_dataset(job_dir: Path) -> DatasetSource:
    """The job's dataset: its training file, with its eval file when it has one."""
    data, evals = job_dir / DATA_FILE, job_dir / EVAL_DATA_FILE
    return TrainEval(str(data), str(evals)) if evals.exists() else str(data)


class ProgressWriter:
    """Appends JobEvents as JSON lines; each line is written whole and flushed, and
    only while ``fence`` (the job's lease) still holds."""

    def __init__(self, path: Path, fence: LeaseFence | None = None) -> None:
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._fence = fence

    def write(self, event: finetune_pb2.JobEvent) -> None:
        event.time_unix_ms = int(time.time() * 1000)
        line = json_format.MessageToJson(event, indent=None) + "\n"
        with self._lock:
            if self._fence is not None:
                self._fence.check()
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def to_job_event(event: TrainEvent) -> finetune_pb2.JobEvent | None:
    """The JobEvent of a trainer event (DoneEvent has none: publication reports it)."""
    if isinstance(event, MetricsEvent):
        return finetune_pb2.JobEvent(
            metrics=finetune_pb2.TrainMetrics(
                step=event.step,
                total_steps=event.total_steps,
                epoch=event.epoch,
                loss=event.loss,
                learning_rate=event.learning_rate,
                tokens_per_second=event.tokens_per_second,
            )
        )
    if isinstance(event, EvalEvent):
        return finetune_pb2.JobEvent(
            evaluation=finetune_pb2.EvalResult(
                stage=event.stage,
                eval_loss=event.eval_loss,
                perplexity=event.perplexity,
                step=event.step,
            )
        )
    if isinstance(event, CheckpointEvent):
        return finetune_pb2.JobEvent(
            checkpoint=finetune_pb2.Checkpoint(step=event.step, path=event.path)
        )
    if isinstance(event, PhaseEvent):
        return finetune_pb2.JobEvent(log=event.message or event.phase)
    if isinstance(event, LogEvent):
        return finetune_pb2.JobEvent(log=event.message)
    return None


class SpanTracker:
    """Spans of the job's phases and epochs, driven by the trainer's events."""

    def __init__(self) -> None:
        self._tracer = get_tracer(__name__)
        self._phase: Any = None
        self._epoch: Any = None
        self._epoch_index = -1

    def _end_epoch(self) -> None:
        if self._epoch is not None:
            self._epoch.end()
            self._epoch = None

    def _end_phase(self) -> None:
        self._end_epoch()
        if self._phase is not None:
            self._phase.end()
            self._phase = None

    def on_event(self, event: TrainEvent) -> None:
        if isinstance(event, PhaseEvent):
            self._end_phase()
            name = {"data": "data preparation", "export": "artifact export"}.get(
                event.phase, event.phase
            )
            self._phase = self._tracer.start_span(f"finetune {name}")
        elif isinstance(event, MetricsEvent):
            # Epoch spans are children of the train phase span.
            steps_per_epoch = max(1, round(event.step / event.epoch)) if event.epoch else 1
            epoch = (event.step - 1) // steps_per_epoch
            if epoch != self._epoch_index:
                self._end_epoch()
                self._epoch_index = epoch
                from opentelemetry import trace

                ctx = trace.set_span_in_context(self._phase) if self._phase else None
                self._epoch = self._tracer.start_span(
                    f"finetune epoch {epoch + 1}", context=ctx, attributes={ATTR_EPOCH: epoch + 1}
                )
            if self._epoch is not None:
                self._epoch.set_attribute(ATTR_LOSS, event.loss)
        elif isinstance(event, CheckpointEvent):
            span = self._epoch or self._phase
            if span is not None:
                span.add_event("checkpoint", {"step": event.step, "path": event.path})
        elif isinstance(event, EvalEvent) and self._phase is not None:
            self._phase.set_attribute(f"eval_loss_{event.stage}", event.eval_loss)

    def close(self) -> None:
        self._end_phase()


def _watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exits the process when the worker that started it is gone: the worker resumes the
    job itself on restart, and must find no second trainer writing the same job."""
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent_pid:
            logger.error("worker %d is gone; stopping", parent_pid)
            os._exit(EXIT_ORPHANED)


@contextlib.contextmanager
def _span(name: str, **attributes: Any) -> Iterator[Any]:
    with get_tracer(__name__).start_as_current_span(name, attributes=attributes) as span:
        yield span


def publish(
    job_dir: Path,
    run: dict[str, Any],
    done: DoneEvent,
    job_id: str,
    fence: LeaseFence | None = None,
) -> dict[str, Any]:
    """Publishes the artifact once: a process restarted after publishing reuses the record."""
    record_path = job_dir / PUBLISHED_FILE
    if record_path.exists():
        return dict(json.loads(record_path.read_text()))
    if fence is not None:
        fence.check()
    from common.model_store import ModelStore

    store = ModelStore(run.get("store_dir") or None)
    metadata = {
        **done.metadata,
        "job_id": job_id,
        "worker_id": run.get("worker_id", ""),
        "traceparent": run.get("traceparent", "") or current_traceparent() or "",
    }
    tp = metadata["traceparent"]
    metadata["trace_id"] = tp.split("-")[1] if tp.count("-") >= 3 else ""
    ref = store.publish(run["output_name"], done.artifact_dir, metadata)
    record = {"name": ref.name, "version": ref.version, "ref": ref.ref, "sha256": ref.sha256}
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, record_path)
    return record


def _read_run(job_dir: Path) -> tuple[str, dict[str, Any]]:
    raw = json.loads((job_dir / "job.json").read_text())
    return raw["job"]["job_id"], raw["run"]


def job_nproc(run: dict[str, Any]) -> int:
    """The job's rank count, checked when the job was created (1 for jobs written
    before ranks existed)."""
    return max(1, int(run.get("nproc") or 1))


def _state_event(value: int, message: str = "") -> finetune_pb2.JobEvent:
    return finetune_pb2.JobEvent(
        state_change=finetune_pb2.StateChange(state=value, message=message)  # type: ignore[arg-type]
    )


def launch_ranks(job_dir: Path, lease_epoch: int, argv: list[str]) -> int:
    """Runs the job as its ``nproc`` ranks; a rank other than 0 that fails without rank 0
    reporting it ends the job FAILED with that rank's exit code in the message."""
    _, run = _read_run(job_dir)

    def on_failure(why: str) -> None:
        fence = LeaseFence(job_dir, lease_epoch) if lease_epoch else None
        progress = ProgressWriter(job_dir / PROGRESS_FILE, fence)
        try:
            progress.write(_state_event(finetune_pb2.FAILED, f"{why}; see the process log"))
        except LeaseLost:
            pass
        finally:
            progress.close()

    threads = max(1, int(run.get("threads", 1)))
    code = launch(["-m", "trainer.job_process", *argv], job_nproc(run), threads, on_failure)
    if code < 0:  # rank 0 died of a signal: so does the job's process, as one process would
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def run_job(job_dir: Path, lease_epoch: int = 0, ranks: Ranks | None = None) -> int:
    """Trains the job in ``job_dir``; returns the process exit code. With
    ``lease_epoch`` every write is fenced by the job's lease (see the module docstring).
    ``ranks``: this process's rank of a data-parallel job (default: one process)."""
    ranks = ranks or Ranks()
    if not ranks.is_main:
        return _run_peer(job_dir, ranks)
    job_id, run = _read_run(job_dir)
    fence = LeaseFence(job_dir, lease_epoch) if lease_epoch else None
    progress = ProgressWriter(job_dir / PROGRESS_FILE, fence)
    cancel_file = job_dir / CANCEL_FILE

    def should_cancel() -> bool:
        if fence is not None:
            fence.check()  # raises LeaseLost: stop before the next step
        return cancel_file.exists()

    def before_write() -> None:
        if fence is not None:
            fence.check()

    spans = SpanTracker()

    import torch

    torch.set_num_threads(_threads_per_rank(run, ranks))

    from trainer.train import TrainingCancelled, train

    def on_event(event: TrainEvent) -> None:
        spans.on_event(event)
        job_event = to_job_event(event)
        if job_event is not None:
            progress.write(job_event)

    def state(value: int, message: str = "") -> None:
        progress.write(_state_event(value, message))

    config = TrainConfig.from_dict(run["config"])
    resume_from = run.get("resume_from") or None
    with _span("finetune job", **{ATTR_JOB_ID: job_id, ATTR_JOB_METHOD: config.method}) as job_span:
        try:
            done = train(
                config,
                run.get("model") or None,
                job_dataset(job_dir),
                job_dir / WORK_DIR,
                on_event=on_event,
                should_cancel=should_cancel,
                resume_from=resume_from,
                device=run.get("device") or "auto",
                before_write=before_write,
                ranks=ranks,
            )
            spans.close()
            with _span("finetune artifact publication"):
                record = publish(job_dir, run, done, job_id, fence)
            progress.write(
                finetune_pb2.JobEvent(
                    artifact=finetune_pb2.Artifact(
                        name=record["name"],
                        version=str(record["version"]),
                        ref=record["ref"],
                        sha256=record["sha256"],
                    )
                )
            )
            state(finetune_pb2.SUCCEEDED, f"published {record['ref']}")
            return 0
        except LeaseLost as exc:
            # Another worker owns the job now: it reports; this process writes nothing.
            logger.error("job %s: lease lost, stopping: %s", job_id, exc)
            return EXIT_LEASE_LOST
        except TrainingCancelled as exc:
            state(finetune_pb2.CANCELLED, f"cancelled after step {exc.step}")
            return EXIT_CANCELLED
        except Exception as exc:  # any failure ends the job with its reason
            logger.exception("job %s failed", job_id)
            record_error(job_span, exc)
            try:
                state(finetune_pb2.FAILED, f"{type(exc).__name__}: {exc}")
            except LeaseLost:
                return EXIT_LEASE_LOST
            return EXIT_FAILED
        finally:
            spans.close()
            progress.close()


def _threads_per_rank(run: dict[str, Any], ranks: Ranks) -> int:
    """The job's thread budget shared by its ranks."""
    return max(1, int(run.get("threads", 1)) // ranks.world_size)


def _run_peer(job_dir: Path, ranks: Ranks) -> int:
    """A rank other than 0: trains its share and writes nothing; its exit code only
    tells the launcher whether it failed."""
    _, run = _read_run(job_dir)
    import torch

    torch.set_num_threads(_threads_per_rank(run, ranks))
    from trainer.distributed import PeerStopped
    from trainer.train import TrainingCancelled, train

    try:
        train(
            TrainConfig.from_dict(run["config"]),
            run.get("model") or None,
            job_dataset(job_dir),
            job_dir / WORK_DIR,
            resume_from=run.get("resume_from") or None,
            device=run.get("device") or "auto",
            ranks=ranks,
        )
        return 0
    except (TrainingCancelled, PeerStopped) as exc:
        logger.info("rank %d: %s", ranks.rank, exc)
        return 0  # rank 0 stopped the run and reports it
    except Exception:
        logger.exception("rank %d failed", ranks.rank)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.job_process", description=__doc__)
    parser.add_argument("--job-dir", required=True, help="the job's folder (job.json inside)")
    parser.add_argument(
        "--lease-epoch",
        type=int,
        default=0,
        help="the job's lease epoch this process runs under (0 = unfenced)",
    )
    args = parser.parse_args(argv)
    ranks = Ranks.from_env()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s"
        + (f" rank {ranks.rank}" if ranks.distributed else "")
        + ": %(message)s",
    )
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    job_dir = Path(args.job_dir)
    if not ranks.distributed and job_nproc(_read_run(job_dir)[1]) > 1:
        return launch_ranks(job_dir, args.lease_epoch, sys.argv[1:] if argv is None else argv)
    if not ranks.is_main:
        return run_job(job_dir, args.lease_epoch, ranks)
    setup_tracing(SERVICE_TRAINER)
    try:
        with attached(context_from_env()):
            return run_job(job_dir, args.lease_epoch, ranks)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())

"""``llmcluster finetune``: create, follow, list and cancel fine-tuning jobs, or train
locally with no cluster (``--local``).

    llmcluster finetune create --data train.jsonl --name support-bot [--method lora] ...
    llmcluster finetune list | get JOB | cancel JOB | watch JOB
    llmcluster finetune --local --data train.jsonl --name support-bot
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from common.config import add_arguments, from_arguments
from common.model_store import validate_name
from common.pb import finetune_pb2, finetune_pb2_grpc
from llmcluster.client import (
    add_target_argument,
    default_target,
    non_negative_int,
    positive_seconds,
)
from llmcluster.connection import open_channel
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

_METHODS = {
    "lora": finetune_pb2.LORA,
    "full": finetune_pb2.FULL,
    "prompt_tuning": finetune_pb2.PROMPT_TUNING,
    "bottleneck": finetune_pb2.BOTTLENECK,
}
# TrainConfig fields that Hyperparameters carries (the CLI flags come from TrainConfig).
_HP_FIELDS = tuple(
    f.name for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields if f.name != "lr_scheduler"
)
_TERMINAL = (finetune_pb2.SUCCEEDED, finetune_pb2.FAILED, finetune_pb2.CANCELLED)
_STATE_CHOICES = [n.lower() for n in finetune_pb2.JobState.keys() if n != "JOB_STATE_UNSPECIFIED"]


def _state_name(state: int) -> str:
    return finetune_pb2.JobState.Name(state)  # type: ignore[arg-type]


class ProgressPrinter:
    """Renders job events: one rewritten progress line while training, full lines for the
    rest (data, evaluation, checkpoints, the artifact, state changes)."""

    def __init__(self, out: TextIO = sys.stdout, width: int = 30) -> None:
        self.out = out
        self.width = width
        self._bar_open = False
        self._tty = out.isatty()
        self._rate_start: tuple[int, float] | None = None  # (step, time_s) of the first report

    def line(self, text: str) -> None:
        if self._bar_open:
            self.out.write("\n")
            self._bar_open = False
        self.out.write(text + "\n")
        self.out.flush()

    def eta(self, step: int, total: int, time_s: float) -> str:
        """Time left at the pace since the first report (``--`` until there is a pace)."""
        if self._rate_start is None or step < self._rate_start[0]:
            self._rate_start = (step, time_s)
        first_step, first_time = self._rate_start
        if step >= total > 0:
            return f"done in {_duration(time_s - first_time)}"
        if step <= first_step or not total:
            return "eta --"
        per_step = (time_s - first_time) / (step - first_step)
        return f"eta {_duration(per_step * (total - step))}"

    def progress(
        self,
        step: int,
        total: int,
        loss: float,
        tokens_per_s: float,
        lr: float,
        time_s: float | None = None,
    ) -> None:
        """One training report; ``time_s`` is when it happened (the event's time; now
        if not given), so a replayed job shows the ETA it had then."""
        filled = int(self.width * step / total) if total else 0
        bar = "#" * filled + "." * (self.width - filled)
        eta = self.eta(step, total, time.time() if time_s is None else time_s)
        text = (
            f"[{bar}] step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:.0f} tok/s  {eta}"
        )
        if self._tty:
            # One line, rewritten in place: \r back to its start, \x1b[K clears the rest.
            self.out.write("\r" + text + "\x1b[K")
            self._bar_open = True
            self.out.flush()
        else:
            self.line(text)

    def eval(self, stage: str, loss: float, perplexity: float, step: int) -> None:
        ppl = f"{perplexity:.2f}" if math.isfinite(perplexity) else "inf"
        self.line(f"eval {stage}: loss {loss:.4f}  perplexity {ppl}  (step {step})")

    def event(self, event: finetune_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "metrics":
            m = event.metrics
            self.progress(
                m.step,
                m.total_steps,
                m.loss,
                m.tokens_per_second,
                m.learning_rate,
                event.time_unix_ms / 1000.0 if event.time_unix_ms else None,
            )
        elif kind == "evaluation":
            e = event.evaluation
            self.eval(e.stage, e.eval_loss, e.perplexity, e.step)
        elif kind == "checkpoint":
            self.line(f"checkpoint at step {event.checkpoint.step}")
        elif kind == "artifact":
            a = event.artifact
            self.line(f"artifact {a.ref}  sha256 {a.sha256[:16]}")
        elif kind == "log":
            self.line(event.log)
        elif kind == "state_change":
            s = event.state_change
            text = _state_name(s.state)
            self.line(f"state {text}" + (f": {s.message}" if s.message else ""))

    def close(self) -> None:
        if self._bar_open:
            self.out.write("\n")
            self._bar_open = False
            self.out.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def hyperparameters_from_args(args: argparse.Namespace) -> finetune_pb2.Hyperparameters:
    """Only the flags given: the worker fills in (and reports) the defaults. The flags are
    checked first with the rules the worker applies (TrainConfig); raises ValueError."""
    from_arguments(TrainConfig, args)
    hp = finetune_pb2.Hyperparameters()
    for name in _HP_FIELDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "lora_target_modules":
            hp.lora_target_modules.extend(value)
        else:
            try:
                setattr(hp, name, value)
            except (TypeError, ValueError) as exc:  # outside the wire type (e.g. < 0)
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: {exc}, got {value!r}") from None
    if getattr(args, "lr_scheduler", None):
        hp.lr_scheduler = args.lr_scheduler
    return hp


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, finetune_pb2_grpc.FineTuneStub]:
    channel = open_channel(
        args,
        args.target or default_target(),
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    return channel, finetune_pb2_grpc.FineTuneStub(channel)


def _fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _print_job(job: finetune_pb2.Job, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True), indent=2)
        )
        return
    line = (
        f"{job.job_id}  {_state_name(job.state):<9}  {job.output_name}  "
        f"{finetune_pb2.Method.Name(job.method).lower()}  worker={job.worker_id}"  # type: ignore[arg-type]
    )
    if job.HasField("latest_metrics"):
        m = job.latest_metrics
        line += f"  step {m.step}/{m.total_steps} loss {m.loss:.4f}"
    if job.HasField("eval_after"):
        line += f"  eval {job.eval_before.eval_loss:.3f} -> {job.eval_after.eval_loss:.3f}"
    if job.artifact.ref:
        line += f"  -> {job.artifact.ref}"
    if job.error:
        line += f"  error: {job.error}"
    print(line)


def follow(events: Iterable[finetune_pb2.JobEvent], printer: ProgressPrinter) -> int | None:
    """Prints events until the stream ends; returns the terminal state seen, if any."""
    final: int | None = None
    for event in events:
        printer.event(event)
        if event.WhichOneof("event") == "state_change" and event.state_change.state in _TERMINAL:
            final = event.state_change.state
    printer.close()
    return final


def _watch(stub: finetune_pb2_grpc.FineTuneStub, job_id: str) -> int:
    printer = ProgressPrinter()
    try:
        final = follow(stub.WatchJob(finetune_pb2.WatchJobRequest(job_id=job_id)), printer)
    except KeyboardInterrupt:
        printer.close()
        print(f"stopped watching; the job goes on: llmcluster finetune watch {job_id}")
        return 130
    if final == finetune_pb2.SUCCEEDED:
        job = stub.GetJob(finetune_pb2.GetJobRequest(job_id=job_id))
        print(f"done: {job.artifact.ref}")
        return 0
    return 1


def read_datasets(args: argparse.Namespace) -> tuple[str, str]:
    """The text of ``--data`` and of ``--eval-data`` ("" when not given); raises OSError
    naming the file that cannot be read."""
    texts = []
    for path in (args.data, args.eval_data):
        try:
            texts.append(Path(path).read_text(encoding="utf-8") if path else "")
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc}") from None
    return texts[0], texts[1]


def _create(args: argparse.Namespace) -> int:
    try:
        text, eval_text = read_datasets(args)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    method = (args.method or "lora").lower()
    if method not in _METHODS:
        print(f"error: --method must be one of {', '.join(_METHODS)}", file=sys.stderr)
        return 2
    try:
        validate_name(args.name)
        hyperparameters = hyperparameters_from_args(args)
    except ValueError as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    request = finetune_pb2.CreateJobRequest(
        base_model=args.model or "",
        method=_METHODS[method],
        output_name=args.name,
        dataset_jsonl=text,
        eval_dataset_jsonl=eval_text,
        hyperparameters=hyperparameters,
        # A token per invocation: a retried CreateJob (e.g. after UNAVAILABLE) is not
        # a second job.
        client_token=args.client_token or uuid.uuid4().hex,
        nproc=args.nproc,
    )
    channel, stub = _stub(args)
    with channel:
        try:
            job = stub.CreateJob(request, timeout=args.timeout)
            print(f"job {job.job_id} {_state_name(job.state)} on worker {job.worker_id}")
            if args.no_watch:
                return 0
            return _watch(stub, job.job_id)
        except grpc.RpcError as exc:
            return _fail(exc)


def _list(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            state = finetune_pb2.JobState.Value(args.state.upper()) if args.state else 0
            reply = stub.ListJobs(
                finetune_pb2.ListJobsRequest(state=state, limit=args.limit),  # type: ignore[arg-type]
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            return _fail(exc)
    for job in reply.jobs:
        _print_job(job, args.json)
    return 0


def _replayed_events(
    stub: finetune_pb2_grpc.FineTuneStub, job: finetune_pb2.Job, timeout_s: float
) -> list[finetune_pb2.JobEvent]:
    """The job's past events. WatchJob replays them, then follows a live job: for one
    that is not over, the replay is read for a short while (it comes at once)."""
    events: list[finetune_pb2.JobEvent] = []
    terminal = job.state in _TERMINAL
    try:
        for event in stub.WatchJob(
            finetune_pb2.WatchJobRequest(job_id=job.job_id),
            timeout=timeout_s if terminal else min(timeout_s, 2.0),
        ):
            events.append(event)
    except grpc.RpcError as exc:
        if terminal or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return events


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000.0))


def _lengths(summary: finetune_pb2.LengthSummary) -> str:
    return f"min {summary.min} / median {summary.median} / p95 {summary.p95} / max {summary.max}"


def format_dataset_report(report: finetune_pb2.DatasetReport) -> list[tuple[str, str]]:
    """The labelled lines of a job's DatasetReport: rows read, kept and dropped by
    reason, the quoted reasons, and the training set's balance."""
    read = f"{report.rows} rows read"
    if report.eval_rows:
        read += f" + {report.eval_rows} eval dataset rows"
    drops = (
        f"{report.empty} empty, {report.invalid} invalid, {report.too_short} too short, "
        f"{report.duplicates} duplicates, "
        + (f"{report.eval_leaked} eval rows leaked from training, " if report.eval_rows else "")
        + f"{report.no_learned_tokens} no learned tokens; {report.truncated} truncated"
    )
    rows = [
        ("dataset", f"{read}; kept {report.train} train / {report.eval} eval"),
        ("dropped", drops),
    ]
    rows += [("dropped row", reason) for reason in report.dropped_reasons]
    rows.append(("learned tokens", _lengths(report.learned_tokens)))
    rows.append(("total tokens", _lengths(report.total_tokens)))
    if report.completion_examples:
        classes = f"{report.distinct_completions} distinct in {report.completion_examples}"
        if report.top_classes:
            classes += ": " + ", ".join(
                f"{c.completion!r} {c.count} ({c.share:.0%})" for c in report.top_classes
            )
        rows.append(("completions", classes))
    return rows


def format_job_details(job: finetune_pb2.Job, events: list[finetune_pb2.JobEvent]) -> str:
    """``finetune get``: the job's settings, data, progress, evaluation, artifact and a
    summary of its events, one labelled line each."""
    method = finetune_pb2.Method.Name(job.method).lower()  # type: ignore[arg-type]
    rows = [
        ("job", f"{job.job_id}  {_state_name(job.state)}  on worker {job.worker_id or '-'}"),
        ("output", f"{job.output_name} ({method}) on {job.base_model or 'the default model'}"),
    ]
    times = f"created {_when(job.created_unix_ms)}, started {_when(job.started_unix_ms)}"
    times += f", finished {_when(job.finished_unix_ms)}"
    if job.started_unix_ms and job.finished_unix_ms:
        took = _duration((job.finished_unix_ms - job.started_unix_ms) / 1000)
        times += f" (took {took})"
    rows.append(("time", times))
    rows.append(("data", f"{job.train_examples} train / {job.eval_examples} eval examples"))
    if job.HasField("dataset_report"):
        rows += format_dataset_report(job.dataset_report)
    hp = json_format.MessageToDict(job.hyperparameters, preserving_proto_field_name=True)
    rows.append(("hyperparameters", "  ".join(f"{k}={v}" for k, v in sorted(hp.items()))))
    if job.HasField("latest_metrics"):
        m = job.latest_metrics
        rows.append(
            (
                "metrics",
                f"step {m.step}/{m.total_steps}  epoch {m.epoch:.2f}  loss {m.loss:.4f}  "
                f"lr {m.learning_rate:.2e}  {m.tokens_per_second:.0f} tok/s",
            )
        )
    for label, e, present in (
        ("eval before", job.eval_before, job.HasField("eval_before")),
        ("eval after", job.eval_after, job.HasField("eval_after")),
    ):
        if present:
            ppl = f"{e.perplexity:.2f}" if math.isfinite(e.perplexity) else "inf"
            rows.append((label, f"loss {e.eval_loss:.4f}  perplexity {ppl}"))
    if job.artifact.ref:
        rows.append(("artifact", f"{job.artifact.ref}  sha256 {job.artifact.sha256}"))
    if job.error:
        rows.append(("error", job.error))
    if job.trace_id:
        rows.append(("trace", job.trace_id))
    kinds: dict[str, int] = {}
    for event in events:
        kind = event.WhichOneof("event") or "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(kinds.items()))
    rows.append(("events", f"{len(events)}" + (f" ({counts})" if counts else "")))
    states = [
        _state_name(e.state_change.state) for e in events if e.WhichOneof("event") == "state_change"
    ]
    if states:
        rows.append(("states", " -> ".join(states)))
    rows += [("log", e.log) for e in events if e.WhichOneof("event") == "log"]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _get(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            job = stub.GetJob(finetune_pb2.GetJobRequest(job_id=args.job), timeout=args.timeout)
            if args.json:
                _print_job(job, True)
                return 0
            events = _replayed_events(stub, job, args.timeout)
        except grpc.RpcError as exc:
            return _fail(exc)
    print(format_job_details(job, events))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            job = stub.CancelJob(
                finetune_pb2.CancelJobRequest(job_id=args.job), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _fail(exc)
    _print_job(job, False)
    return 0


def _watch_cmd(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            return _watch(stub, args.job)
        except grpc.RpcError as exc:
            return _fail(exc)


def _local(args: argparse.Namespace) -> int:
    """Trains on this machine with the trainer library; no worker, no router."""
    from trainer.data import DatasetError
    from trainer.events import CheckpointEvent, EvalEvent, LogEvent, MetricsEvent, PhaseEvent
    from trainer.local import run_local
    from trainer.train import TrainingCancelled

    printer = ProgressPrinter()

    def on_event(event: Any) -> None:
        if isinstance(event, MetricsEvent):
            printer.progress(
                event.step,
                event.total_steps,
                event.loss,
                event.tokens_per_second,
                event.learning_rate,
            )
        elif isinstance(event, EvalEvent):
            printer.eval(event.stage, event.eval_loss, event.perplexity, event.step)
        elif isinstance(event, CheckpointEvent):
            printer.line(f"checkpoint at step {event.step}: {event.path}")
        elif isinstance(event, (PhaseEvent, LogEvent)):
            printer.line(getattr(event, "message", "") or getattr(event, "phase", ""))

    from trainer.data import TrainEval

    try:
        config = from_arguments(TrainConfig, args)
        run = run_local(
            TrainEval(args.data, args.eval_data) if args.eval_data else args.data,
            name=args.name,
            config=config,
            base_model=args.model or None,
            work_dir=args.work_dir,
            store_root=args.store,
            on_event=on_event,
            device=args.device,
        )
    except (DatasetError, ValueError) as exc:
        printer.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingCancelled, KeyboardInterrupt):
        printer.close()
        print("cancelled", file=sys.stderr)
        return 130
    printer.close()
    if run.artifact_ref:
        print(f"done: {run.artifact_ref}  sha256 {run.sha256}")
    else:
        print(f"done: artifact in {run.done.artifact_dir}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    if args.local:
        if not args.data:
            print("error: --local needs --data", file=sys.stderr)
            return 2
        return _local(args)
    print(
        "error: choose create, list, get, cancel or watch (or --local); see --help",
        file=sys.stderr,
    )
    return 2


def _add_training_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--data", required=required, help="JSONL dataset file")
    parser.add_argument(
        "--eval-data",
        default="",
        help="JSONL eval dataset file: the eval split instead of --eval-fraction's "
        "(rows also in --data are removed from it)",
    )
    parser.add_argument("--model", default="", help="base model (default: the default model)")
    # --method, --epochs, --learning-rate, --lora-r, ... come from TrainConfig.
    add_arguments(parser, TrainConfig)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``llmcluster finetune`` and its subcommands."""
    ft = sub.add_parser(
        "finetune",
        help="fine-tuning jobs: create, list, get, cancel, watch; --local trains here",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ft.add_argument("--local", action="store_true", help="train on this machine, no cluster")
    ft.add_argument("--name", help="with --local: publish to the model store under NAME")
    ft.add_argument("--work-dir", help="with --local: checkpoints and artifact folder")
    ft.add_argument("--store", help="with --local: model store root (default: home/store)")
    ft.add_argument("--device", default="auto", help="with --local: cpu, cuda (default: auto)")
    _add_training_flags(ft, required=False)
    ft.set_defaults(func=_finetune)
    actions = ft.add_subparsers(dest="action", metavar="ACTION")

    create = actions.add_parser("create", help="create a job and stream its progress")
    _add_training_flags(create, required=True)
    create.add_argument("--name", required=True, help="name the adapter is registered under")
    create.add_argument("--client-token", default="", help="idempotency token (default: random)")
    create.add_argument("--no-watch", action="store_true", help="return once the job is queued")
    create.add_argument(
        "--nproc",
        type=non_negative_int,
        default=0,
        help="data-parallel training processes on the worker (0: the worker's --nproc)",
    )
    create.add_argument(
        "--timeout", type=positive_seconds, default=120.0, help="CreateJob deadline (s)"
    )
    add_target_argument(create)
    create.set_defaults(func=_create)

    lst = actions.add_parser("list", help="list jobs, newest first")
    lst.add_argument(
        "--state",
        default="",
        type=str.lower,
        choices=["", *_STATE_CHOICES],
        help="only jobs in this state",
    )
    lst.add_argument("--limit", type=non_negative_int, default=0, help="at most this many")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--timeout", type=positive_seconds, default=10.0, help="deadline (s)")
    add_target_argument(lst)
    lst.set_defaults(func=_list)

    for name, func, text in (
        ("get", _get, "show one job"),
        ("cancel", _cancel, "cancel a job (it stops within a training step)"),
        ("watch", _watch_cmd, "replay a job's events, then follow it to the end"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("job", help="job id")
        p.add_argument("--timeout", type=positive_seconds, default=10.0, help="deadline (s)")
        if name == "get":
            p.add_argument("--json", action="store_true", help="print JSON")
        add_target_argument(p)
        p.set_defaults(func=func)

    from llmcluster.sweep_cli import register_sweep  # here: sweep_cli imports this module

    register_sweep(actions)

"""``llmcluster finetune sweep``: hyperparameter sweeps whose trials are fine-tuning jobs.

    llmcluster finetune sweep create --data train.jsonl --name support-bot \\
        --lr-choices 1e-4,3e-4 --lora-r-choices 8,16 [--strategy grid] [--parallelism 2]
    llmcluster finetune sweep create ... --strategy random --lr-range 1e-5:1e-3 --max-trials 8
    llmcluster finetune sweep create ... --strategy tpe --lr-range 1e-5:1e-3 --max-trials 12
    llmcluster finetune sweep list | get SWEEP | watch SWEEP | cancel SWEEP

The training flags (--max-steps, --batch-size, ...) set the base job every trial starts
from; the ``*-choices`` / ``--lr-range`` flags say what varies. ``create`` follows the
sweep as its trials change, then prints the table of trials and the best, which is
published as NAME@VERSION.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from common.errors import InvalidArgument
from common.model_store import validate_name
from common.pb import finetune_pb2, finetune_pb2_grpc
from common.validation import sweep_spec_from_pb
from llmcluster.client import add_target_argument, non_negative_int, positive_seconds
from llmcluster.finetune_cli import (
    _METHODS,
    _add_training_flags,
    _stub,
    hyperparameters_from_args,
    read_datasets,
)

_STRATEGIES = {"grid": finetune_pb2.GRID, "random": finetune_pb2.RANDOM, "tpe": finetune_pb2.TPE}
_COLUMNS = (  # (header, Hyperparameters field)
    ("lr", "learning_rate"),
    ("lora_r", "lora_r"),
    ("alpha", "lora_alpha"),
    ("epochs", "epochs"),
    ("batch", "batch_size"),
)


def _state(value: int) -> str:
    return finetune_pb2.JobState.Name(value)  # type: ignore[arg-type]


def _choices(text: str | None, kind: type) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a comma-separated list of numbers") from None


def build_sweep_request(
    args: argparse.Namespace, dataset_jsonl: str
) -> finetune_pb2.CreateSweepRequest:
    """The CreateSweepRequest of the flags, checked with the server's rules (raises
    InvalidArgument / ValueError naming what is wrong)."""
    validate_name(args.name)
    method = (args.method or "lora").lower()
    if method not in _METHODS:
        raise InvalidArgument(f"--method must be one of {', '.join(_METHODS)}")
    space = finetune_pb2.SearchSpace(
        learning_rate=_choices(args.lr_choices, float),
        lora_r=_choices(args.lora_r_choices, int),
        lora_alpha=_choices(args.lora_alpha_choices, float),
        epochs=_choices(args.epochs_choices, int),
        batch_size=_choices(args.batch_size_choices, int),
    )
    if args.lr_range:
        low, sep, high = args.lr_range.partition(":")
        try:
            space.learning_rate_range.CopyFrom(
                finetune_pb2.FloatRange(min=float(low), max=float(high), log=not args.lr_linear)
            )
            if not sep:
                raise ValueError
        except ValueError:
            raise InvalidArgument(f"--lr-range must be MIN:MAX, got {args.lr_range!r}") from None
    request = finetune_pb2.CreateSweepRequest(
        base=finetune_pb2.CreateJobRequest(
            base_model=args.model or "",
            method=_METHODS[method],
            output_name=args.name,
            dataset_jsonl=dataset_jsonl,
            hyperparameters=hyperparameters_from_args(args),
        ),
        space=space,
        strategy=_STRATEGIES[args.strategy],
        max_trials=args.max_trials,
        parallelism=args.parallelism,
        seed=args.sweep_seed,
        discard_trials=args.discard_trials,
        client_token=args.client_token or uuid.uuid4().hex,
    )
    sweep_spec_from_pb(request)
    return request


def format_trials(sweep: finetune_pb2.Sweep) -> str:
    """The table of trials (params, state, eval loss, job) and a last line with the best."""
    header = ["#", *(h for h, _ in _COLUMNS), "state", "eval_loss", "job", ""]
    rows = [header]
    for t in sweep.trials:
        params = []
        for _, name in _COLUMNS:
            if t.params.HasField(name):
                value = getattr(t.params, name)
                params.append(f"{value:.3g}" if isinstance(value, float) else str(value))
            else:
                params.append("-")
        loss = f"{t.eval_loss:.4f}" if t.HasField("eval_loss") else "-"
        rows.append(
            [
                str(t.number),
                *params,
                _state(t.state),
                loss,
                t.job_id or "-",
                "best" if t.best else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    summary = f"sweep {sweep.sweep_id}  {_state(sweep.state)}  {len(sweep.trials)} trial(s)"
    if sweep.best_ref:
        summary += f"  best: trial {sweep.best_trial} -> {sweep.best_ref}"
    if sweep.error:
        summary += f"  error: {sweep.error}"
    return "\n".join([*lines, summary])


def _fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


class LiveTable:
    """Redraws a block of text in place on a terminal (cursor up over the last drawing,
    clear to the end of the screen, write the new one)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lines = 0

    def draw(self, text: str) -> None:
        if self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")
        self.out.write(text + "\n")
        self.out.flush()
        self._lines = text.count("\n") + 1


def apply_event(sweep: finetune_pb2.Sweep, event: finetune_pb2.SweepEvent) -> None:
    """Brings a Sweep up to date with one of its events (the trial's new state)."""
    sweep.state = event.state
    if event.HasField("trial"):
        for trial in sweep.trials:
            if trial.number == event.trial.number:
                trial.CopyFrom(event.trial)


def _follow(stub: finetune_pb2_grpc.FineTuneStub, sweep_id: str, out: TextIO = sys.stdout) -> int:
    """Follows the sweep to its end: on a terminal a live table of its trials, else one
    line per event; then the final table and the best."""
    sweep = stub.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep_id))
    live = LiveTable(out) if out.isatty() else None
    try:
        for event in stub.WatchSweep(finetune_pb2.WatchSweepRequest(sweep_id=sweep_id)):
            apply_event(sweep, event)
            if live is not None:
                live.draw(format_trials(sweep) + "\n" + event.message)
            else:
                print(event.message, file=out, flush=True)
    except KeyboardInterrupt:
        print(f"stopped watching; the sweep goes on: llmcluster finetune sweep watch {sweep_id}")
        return 130
    sweep = stub.GetSweep(finetune_pb2.GetSweepRequest(sweep_id=sweep_id))
    if live is not None:
        live.draw(format_trials(sweep))
    else:
        print(format_trials(sweep), file=out)
    return 0 if sweep.state == finetune_pb2.SUCCEEDED else 1


def _create(args: argparse.Namespace) -> int:
    try:
        text, eval_text = read_datasets(args)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        request = build_sweep_request(args, text)
        request.base.eval_dataset_jsonl = eval_text
    except (InvalidArgument, ValueError) as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    channel, stub = _stub(args)
    with channel:
        try:
            sweep = stub.CreateSweep(request, timeout=args.timeout)
            print(
                f"sweep {sweep.sweep_id}: {sweep.planned_trials} trial(s) on worker "
                f"{sweep.worker_id}, {sweep.parallelism} at a time"
            )
            if args.no_watch:
                return 0
            return _follow(stub, sweep.sweep_id)
        except grpc.RpcError as exc:
            return _fail(exc)


def _list(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            reply = stub.ListSweeps(
                finetune_pb2.ListSweepsRequest(limit=args.limit), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _fail(exc)
    for s in reply.sweeps:
        done = sum(1 for t in s.trials if t.state == finetune_pb2.SUCCEEDED)
        line = (
            f"{s.sweep_id}  {_state(s.state):<9}  {s.output_name}  {done}/{s.planned_trials} done"
        )
        print(line + (f"  best {s.best_ref}" if s.best_ref else ""))
    return 0


def _one(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            if args.action == "watch":
                return _follow(stub, args.sweep)
            if args.action == "cancel":
                sweep = stub.CancelSweep(
                    finetune_pb2.CancelSweepRequest(sweep_id=args.sweep), timeout=args.timeout
                )
            else:
                sweep = stub.GetSweep(
                    finetune_pb2.GetSweepRequest(sweep_id=args.sweep), timeout=args.timeout
                )
        except grpc.RpcError as exc:
            return _fail(exc)
    if getattr(args, "json", False):
        print(
            json.dumps(json_format.MessageToDict(sweep, preserving_proto_field_name=True), indent=2)
        )
    else:
        print(format_trials(sweep))
    return 0


def register_sweep(actions: argparse._SubParsersAction) -> None:
    """Adds ``finetune sweep`` and its actions under ``finetune``'s subcommands."""
    sweep = actions.add_parser(
        "sweep",
        help="hyperparameter sweeps: create, list, get, watch, cancel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = sweep.add_subparsers(dest="sweep_action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="start a sweep and follow it to the best trial")
    _add_training_flags(create, required=True)
    create.add_argument("--name", required=True, help="name the best adapter is published under")
    create.add_argument("--strategy", choices=sorted(_STRATEGIES), default="grid")
    create.add_argument("--lr-choices", help="learning rates to try, e.g. 1e-4,3e-4")
    create.add_argument("--lr-range", help="random / tpe: learning-rate range MIN:MAX (log scale)")
    create.add_argument("--lr-linear", action="store_true", help="sample --lr-range uniformly")
    create.add_argument("--lora-r-choices", help="LoRA ranks to try, e.g. 8,16")
    create.add_argument("--lora-alpha-choices", help="LoRA alphas to try")
    create.add_argument("--epochs-choices", help="epoch counts to try")
    create.add_argument("--batch-size-choices", help="batch sizes to try")
    create.add_argument(
        "--max-trials", type=non_negative_int, default=0, help="trial budget (grid: 0 = all)"
    )
    create.add_argument(
        "--parallelism", type=non_negative_int, default=1, help="trials at once (default: 1)"
    )
    create.add_argument(
        "--discard-trials",
        action="store_true",
        help="remove the trials' own adapters once the best is published",
    )
    create.add_argument("--sweep-seed", type=non_negative_int, default=0, help="random / tpe: seed")
    create.add_argument("--client-token", default="", help="idempotency token (default: random)")
    create.add_argument("--no-watch", action="store_true", help="return once it is created")
    create.add_argument("--timeout", type=positive_seconds, default=120.0, help="deadline (s)")
    add_target_argument(create)
    create.set_defaults(func=_create)

    lst = sub.add_parser("list", help="list sweeps, newest first")
    lst.add_argument("--limit", type=non_negative_int, default=0, help="at most this many")
    lst.add_argument("--timeout", type=positive_seconds, default=10.0, help="deadline (s)")
    add_target_argument(lst)
    lst.set_defaults(func=_list)

    for name, text in (
        ("get", "show a sweep's table of trials"),
        ("watch", "follow a sweep to its end, then show the table"),
        ("cancel", "launch no more trials and cancel the running ones"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("sweep", help="sweep id")
        p.add_argument("--timeout", type=positive_seconds, default=10.0, help="deadline (s)")
        if name == "get":
            p.add_argument("--json", action="store_true", help="print JSON")
        add_target_argument(p)
        p.set_defaults(func=_one, action=name)

"""Light commands stay light (issue 22): the start-up of ``llmcluster finetune list`` and
``llmcluster models`` against a running router, as a ratio to ``llmcluster --help``.

Starts a null-engine worker (no model weights) and a router over it in a temporary
``LLMCLUSTER_HOME``, creates and cancels one fine-tuning job so that ``finetune list``
prints one line, then runs each command ``--runs`` times, interleaved so that machine
noise hits all of them alike, and prints the medians and ratios. Exits 1 when a ratio
exceeds ``--max-ratio`` (3), unless ``--no-fail``. Speed is asserted here, never in timed
unit tests.

    python -m benchmarks.light_commands            # 10 runs each
    python -m benchmarks.light_commands --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.procs import REPO_ROOT, ProcessRegistry, free_port, llmcluster_argv
from common.pb import finetune_pb2, finetune_pb2_grpc

logger = logging.getLogger(__name__)


def _dataset(rows: int = 12) -> str:
    """A tiny valid prompt/completion JSONL (the job is cancelled before it trains)."""
    lines = [
        json.dumps({"prompt": f"Add {i} and {i}:", "completion": f" {2 * i}"}) for i in range(rows)
    ]
    return "\n".join(lines) + "\n"


def _cancelled_job(router: str) -> str:
    """Creates one job through the router and waits until it is CANCELLED."""
    with grpc.insecure_channel(router) as channel:
        ft = finetune_pb2_grpc.FineTuneStub(channel)
        job = ft.CreateJob(
            finetune_pb2.CreateJobRequest(
                output_name="light-commands",
                dataset_jsonl=_dataset(),
                hyperparameters=finetune_pb2.Hyperparameters(max_steps=1, eval_fraction=0.0),
            ),
            timeout=60,
        )
        ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
        deadline = time.monotonic() + 120
        get = finetune_pb2.GetJobRequest(job_id=job.job_id)
        while ft.GetJob(get, timeout=10).state != finetune_pb2.CANCELLED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.job_id} was not CANCELLED within 120 s")
            time.sleep(0.2)
        return str(job.job_id)


def _time_once(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return elapsed, proc.stdout


@dataclass
class Figures:
    """Seconds per command (median and fastest of the runs) and medians over --help's."""

    runs: int
    median_s: dict[str, float]
    min_s: dict[str, float]
    ratio_to_help: dict[str, float]
    finetune_list_output: str


def measure(runs: int) -> Figures:
    """Starts the cluster, times the commands, stops everything; returns the figures."""
    home = Path(tempfile.mkdtemp(prefix="light-commands-"))
    env = {"LLMCLUSTER_HOME": str(home)}
    registry = ProcessRegistry(env)
    try:
        wport, rport = free_port(), free_port()
        worker = registry.start(
            "worker",
            llmcluster_argv(
                "worker", "--engine", "null", "--port", str(wport),
                "--worker-id", "light", "--self-test-interval-s", "0",
            ),
            wport,
        )  # fmt: skip
        worker.wait_healthy(300)
        router = registry.start(
            "router",
            llmcluster_argv("router", "--port", str(rport), "--workers", worker.address),
            rport,
        )
        router.wait_healthy(120)
        job_id = _cancelled_job(router.address)
        # The commands as a user types them: the console entry point, this checkout.
        entry = [sys.executable, "-m", "llmcluster"]
        commands = {
            "--help": [*entry, "--help"],
            "finetune list": [*entry, "finetune", "list", "--target", router.address],
            "models": [*entry, "models", "--target", router.address],
        }
        cmd_env = {**os.environ, **env}
        _, listed = _time_once(commands["finetune list"], cmd_env)
        if job_id not in listed:
            raise RuntimeError(f"finetune list did not show {job_id}:\n{listed}")
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, argv in commands.items():
                times[name].append(_time_once(argv, cmd_env)[0])
    finally:
        registry.stop_all()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return Figures(
        runs=runs,
        median_s=medians,
        min_s={name: min(values) for name, values in times.items()},
        ratio_to_help={
            name: medians[name] / medians["--help"] for name in medians if name != "--help"
        },
        finetune_list_output=listed.strip(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    parser.add_argument("--max-ratio", type=float, default=3.0, help="the bar (issue 22)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-fail", action="store_true", help="report only, exit 0")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    figures = measure(args.runs)
    print(f"finetune list printed: {figures.finetune_list_output}")
    print(f"{'command':<16}{'median s':>10}{'min s':>10}{'ratio':>8}")
    for name, median in figures.median_s.items():
        ratio = figures.ratio_to_help.get(name)
        shown = f"{ratio:.2f}x" if ratio is not None else "1"
        print(f"{name:<16}{median:>10.3f}{figures.min_s[name]:>10.3f}{shown:>8}")
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    missed = {name: r for name, r in figures.ratio_to_help.items() if r > args.max_ratio}
    if missed:
        print(f"MISSED: ratio to --help above {args.max_ratio}: {missed}")
        return 0 if args.no_fail else 1
    print(f"ok: every ratio to --help <= {args.max_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

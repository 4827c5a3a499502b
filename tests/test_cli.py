"""The CLI as a user meets it: prompts from stdin and files, every bad flag refused before
any call with the server's wording (never a traceback), job details and a progress ETA."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from common.pb import finetune_pb2, generate_pb2
from common.validation import GenerationLimits, SamplingParams
from llmcluster.cli import build_parser
from llmcluster.client import UsageError, build_request
from llmcluster.finetune_cli import ProgressPrinter, format_job_details
from tests.procs import REPO_ROOT

NOBODY = "127.0.0.1:1"  # nothing listens: a request that got this far would be UNAVAILABLE


def _args(*argv: str):
    argv_list = ["generate", *argv]
    return build_parser(argv_list).parse_args(argv_list)


def _cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmcluster", *argv],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prompt_from_argument_stdin_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert build_request(_args("hello")).prompt == "hello"
    long_prompt = "word " * 50_000  # far beyond what a shell argument may hold
    monkeypatch.setattr(sys, "stdin", io.StringIO(long_prompt))
    assert build_request(_args("-")).prompt == long_prompt
    path = tmp_path / "prompt.txt"
    path.write_text("from a file\n", encoding="utf-8")
    assert build_request(_args("--prompt-file", str(path))).prompt == "from a file\n"
    chat = build_request(_args("--chat", "--system", "be brief", "--prompt-file", str(path)))
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "be brief"),
        ("user", "from a file\n"),
    ]
    with pytest.raises(UsageError, match="not both"):
        build_request(_args("x", "--prompt-file", str(path)))
    with pytest.raises(UsageError, match="a prompt is needed"):
        build_request(_args())
    with pytest.raises(UsageError, match="cannot read"):
        build_request(_args("--prompt-file", str(tmp_path / "missing.txt")))


# Flags the wire can carry: the client's refusal must be the server's message, word for word.
SERVER_CHECKED = [
    (["--max-new-tokens", "0"], {"max_new_tokens": 0}),
    (["--temperature", "-1"], {"temperature": -1.0}),
    (["--top-p", "2"], {"top_p": 2.0}),
    (["--top-p", "0"], {"top_p": 0.0}),
    (["--repetition-penalty", "0"], {"repetition_penalty": 0.0}),
    (["--logprobs", "21"], {"logprobs": 21}),
    (["--stop", ""], {"stop": [""]}),
]


@pytest.mark.parametrize(("flags", "fields"), SERVER_CHECKED, ids=lambda v: str(v))
def test_bad_flags_are_refused_with_the_servers_wording(flags: list[str], fields: dict) -> None:
    with pytest.raises(InvalidArgument) as server:
        SamplingParams.from_pb(generate_pb2.SamplingParams(**fields), GenerationLimits())
    with pytest.raises(UsageError) as client:
        build_request(_args("x", *flags))
    assert str(client.value) == str(server.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "-1"], "params.max_new_tokens must be in [1, 2048], got -1"),
        (["--top-k", "-3"], "params.top_k must be >= 0"),
        (["--seed", "-1"], "params.seed must be >= 0, got -1"),
        (["--logprobs", "-1"], "params.logprobs must be in [0, 20], got -1"),
        (["--adapter", "../etc"], "adapter: artifact name '../etc'"),
    ],
)
def test_flags_the_wire_cannot_carry_exit_2_without_a_traceback(
    flags: list[str], message: str
) -> None:
    out = _cli("generate", "x", *flags, "--target", NOBODY)
    assert out.returncode == 2, out.stderr
    assert f"error: INVALID_ARGUMENT: {message}" in out.stderr
    assert "Traceback" not in out.stderr and "UNAVAILABLE" not in out.stderr


def test_more_tokens_than_the_default_limit_is_the_servers_call() -> None:
    # The server's --max-new-tokens-limit may be higher than the default 2048.
    assert build_request(_args("x", "--max-new-tokens", "5000")).params.max_new_tokens == 5000


def test_empty_stdin_prompt_is_refused_before_a_call() -> None:
    out = _cli("generate", "-", "--target", NOBODY, stdin="")
    assert out.returncode == 2 and "prompt is empty" in out.stderr, out.stderr


def test_finetune_flags_are_checked_before_a_call(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    for flags, message in (
        (["--epochs", "-1"], "epochs"),
        (["--learning-rate", "-0.1"], "learning_rate"),
        (["--name", "../x"], "artifact name"),
    ):
        name = [] if "--name" in flags else ["--name", "bot"]
        out = _cli("finetune", "create", "--data", str(data), *name, *flags, "--target", NOBODY)
        assert out.returncode == 2, (flags, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_progress_shows_an_eta_from_the_pace_so_far() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out)
    printer.progress(1, 11, 2.0, 100.0, 1e-4, time_s=1000.0)
    printer.progress(3, 11, 1.5, 100.0, 1e-4, time_s=1004.0)  # 2 s a step, 8 steps left
    printer.progress(11, 11, 1.0, 100.0, 1e-4, time_s=1020.0)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("eta --")
    assert lines[1].endswith("eta 16s")
    assert lines[2].endswith("done in 20s")


def test_job_details_name_settings_data_metrics_and_artifact() -> None:
    job = finetune_pb2.Job(
        job_id="ft-1",
        state=finetune_pb2.SUCCEEDED,
        output_name="support-bot",
        method=finetune_pb2.LORA,
        hyperparameters=finetune_pb2.Hyperparameters(epochs=4, learning_rate=0.002),
        latest_metrics=finetune_pb2.TrainMetrics(step=10, total_steps=10, loss=0.25),
        eval_before=finetune_pb2.EvalResult(eval_loss=2.0, perplexity=7.39),
        eval_after=finetune_pb2.EvalResult(eval_loss=0.5, perplexity=1.65),
        artifact=finetune_pb2.Artifact(ref="support-bot@2", sha256="ab" * 32),
        train_examples=40,
        eval_examples=8,
        worker_id="w0",
    )
    events = [
        finetune_pb2.JobEvent(state_change=finetune_pb2.StateChange(state=finetune_pb2.QUEUED)),
        finetune_pb2.JobEvent(log="dataset: kept 48 of 50 rows; dropped 2 duplicate"),
        finetune_pb2.JobEvent(metrics=finetune_pb2.TrainMetrics(step=10)),
        finetune_pb2.JobEvent(state_change=finetune_pb2.StateChange(state=finetune_pb2.SUCCEEDED)),
    ]
    text = format_job_details(job, events)
    assert "ft-1  SUCCEEDED  on worker w0" in text
    assert "epochs=4" in text and "learning_rate=0.002" in text
    assert "40 train / 8 eval examples" in text
    assert "step 10/10" in text and "loss 0.2500" in text
    assert "eval before      loss 2.0000" in text and "eval after       loss 0.5000" in text
    assert "support-bot@2  sha256 " + "ab" * 32 in text
    assert "4 (1 log, 1 metrics, 2 state change)" in text
    assert "QUEUED -> SUCCEEDED" in text
    assert "dataset: kept 48 of 50 rows; dropped 2 duplicate" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["finetune", "list", "--state", "bogus"],
        ["finetune", "list", "--limit", "-1"],
        ["finetune", "get", "ft-x", "--timeout", "0"],
        ["generate", "x", "--timeout", "-1"],
        ["generate", "x", "--max-new-tokens", "many"],
        ["models", "--timeout", "nan"],
    ],
    ids=" ".join,
)
def test_every_other_bad_flag_is_a_usage_error_not_a_traceback(argv: list[str]) -> None:
    out = _cli(*argv, "--target", NOBODY)
    assert out.returncode == 2, out.stderr
    assert "error: argument" in out.stderr and "Traceback" not in out.stderr

"""The client commands stay light: ``llmcluster finetune list|get|cancel|watch`` and
``llmcluster models`` run in a fresh interpreter without importing torch or
transformers (trainer/__init__ loads its torch-backed names on first use)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import REPO_ROOT, free_port

HEAVY = ("torch", "transformers", "peft", "safetensors")

# Runs the real entry point (llmcluster.cli.main, what `python -m llmcluster` calls) in
# this interpreter, then reports its exit code and which heavy modules got imported.
_PROBE = f"""
import json, sys
from llmcluster.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _probe(*argv: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"stderr": proc.stderr}


@pytest.mark.parametrize(
    "command",
    [
        ("finetune", "--help"),
        ("finetune", "list"),
        ("finetune", "get", "job-1"),
        ("finetune", "cancel", "job-1"),
        ("finetune", "watch", "job-1"),
        ("models",),
    ],
    ids=lambda c: " ".join(c),
)
def test_client_commands_import_neither_torch_nor_transformers(command) -> None:
    # Nothing listens on the target: the command runs its whole client path and fails
    # with UNAVAILABLE (what a user without a cluster sees) instead of answering.
    target = ("--target", f"127.0.0.1:{free_port()}") if "--help" not in command else ()
    result = _probe(*command, *target)
    assert result["heavy"] == [], f"{' '.join(command)} imported {result['heavy']}"
    if "--help" in command:
        assert result["code"] == 0
    else:
        assert result["code"] not in (0, None), result
        assert "UNAVAILABLE" in result["stderr"] or "unavailable" in result["stderr"].lower()


def test_importing_the_client_modules_and_trainer_config_stays_light() -> None:
    code = (
        "import sys, llmcluster.client, llmcluster.finetune_cli, trainer, trainer.config;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_torch_backed_trainer_names_still_resolve() -> None:
    """Lazy, not gone: ``trainer.train`` stays the function even after the submodule of
    the same name is imported."""
    import trainer
    import trainer.train  # noqa: F401 - binds the submodule on the package
    from trainer import TrainingCancelled, latest_checkpoint, run_local, train

    assert callable(train) and train.__module__ == "trainer.train"
    assert trainer.train is train
    assert issubclass(TrainingCancelled, BaseException)
    assert callable(run_local) and callable(latest_checkpoint)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trainer.nope  # noqa: B018


@pytest.mark.benchmark
def test_light_commands_benchmark_measures_against_a_running_router(tmp_path) -> None:
    """``python -m benchmarks.light_commands`` runs end to end: the cancelled job is
    listed and a ratio to ``--help`` is reported for each client command."""
    out = tmp_path / "light.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.light_commands", "--runs", "1", "--no-fail",
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert "CANCELLED" in figures["finetune_list_output"]
    assert set(figures["ratio_to_help"]) == {"finetune list", "models"}
    assert all(r > 0 for r in figures["ratio_to_help"].values())

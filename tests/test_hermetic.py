"""Hermetic test runs: a run never reads or writes the user's LLMCLUSTER_HOME. The proof
runs tests again in a child pytest whose "user" home is poisoned with an extra adapter and
an extra job, and checks that they still pass and that the poisoned home is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from common.config import home_dir
from common.model_store import ModelStore
from common.pb import finetune_pb2
from tests.conftest import USER_HOME
from tests.procs import REPO_ROOT
from tests.test_model_store import make_adapter


def test_home_is_fresh_and_private(tmp_path: Path) -> None:
    home = home_dir()
    assert home.resolve() != USER_HOME.resolve()
    assert not home.resolve().is_relative_to(USER_HOME.resolve())
    assert sorted(p.name for p in home.iterdir()) == ["models"], "a new home holds only models"
    assert ModelStore().list() == []
    assert not (home / "jobs").exists()


def test_each_test_has_its_own_home(_module_home: Path, _test_home: Path) -> None:
    assert home_dir() == _test_home != _module_home
    assert (_test_home / "models").resolve() == (_module_home / "models").resolve()


def _poisoned_home(root: Path) -> Path:
    """A user home as the README's fine-tuning section leaves it, plus a stray job."""
    root.mkdir(parents=True)
    (root / "models").symlink_to((home_dir() / "models").resolve(), target_is_directory=True)
    store = ModelStore(root / "store")
    for name in ("bad2", "support-bot"):
        store.publish(name, make_adapter(root / "src" / name))
    job = finetune_pb2.Job(
        job_id="poison-job",
        state=finetune_pb2.SUCCEEDED,
        output_name="bad2",
        artifact=finetune_pb2.Artifact(name="bad2", version="1", ref="bad2@1"),
    )
    (root / "jobs" / "poison-job").mkdir(parents=True)
    (root / "jobs" / "poison-job" / "job.json").write_text(
        json.dumps({"job": json_format.MessageToDict(job)})
    )
    (root / "jobs" / "poison-job" / "events.jsonl").write_text("")
    return root


def _snapshot(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if not p.is_symlink() and p.is_file()
    }


def _run_pytest_with_home(user_home: Path, *tests: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMCLUSTER_HOME": str(user_home), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize(
    "tests",
    [
        pytest.param(["tests/test_hermetic.py::test_home_is_fresh_and_private"], id="fresh-home"),
        pytest.param(
            [
                "tests/test_hermetic.py::test_home_is_fresh_and_private",
                "tests/test_worker.py::test_list_models_and_health",
            ],
            id="worker-lists-no-user-adapters",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_poisoned_user_home_changes_no_result(tmp_path: Path, tests: list[str]) -> None:
    poisoned = _poisoned_home(tmp_path / "user-home")
    assert [r.ref for r in ModelStore(poisoned / "store").list()] == ["bad2@1", "support-bot@1"]
    before = _snapshot(poisoned)
    result = _run_pytest_with_home(poisoned, *tests)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(tests)} passed" in result.stdout
    assert _snapshot(poisoned) == before, "the run wrote into the user's home"

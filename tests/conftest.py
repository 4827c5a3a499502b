"""Shared fixtures: the default model loaded once per session, a tiny random model of
the same architecture and tokenizer for mechanics, and real worker processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Keep transformers from reaching for a hub during tests: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The user's llmcluster home, read once before the run replaces it: the only thing taken
# from it is the converted default model, linked read-only (see pytest_configure).
USER_HOME = Path(os.environ.get("LLMCLUSTER_HOME") or Path.home() / ".cache" / "llmcluster")


def pytest_configure(config: pytest.Config) -> None:
    """Hermetic runs: LLMCLUSTER_HOME is a fresh temporary folder for the whole run (every
    process a test starts inherits it). The one thing shared is the run's model cache,
    ``<run>/models``, which every home of the run links as its ``models``: it holds links
    to the user's converted default model when there is one, and otherwise (CI) the
    conversion the run's first use makes, once."""
    import tempfile

    if hasattr(config, "workerinput"):  # pytest-xdist worker: the controller set it up
        return
    run_dir = Path(tempfile.mkdtemp(prefix="llmcluster-tests-"))
    models = run_dir / "models"
    models.mkdir()
    user_models = USER_HOME / "models"
    if user_models.is_dir():
        for folder in user_models.iterdir():
            if folder.is_dir() and (folder / "model.safetensors").exists():
                (models / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
            elif folder.name.endswith(".f32.gguf"):  # the llama.cpp peer's (benchmarks/)
                (models / folder.name).symlink_to(folder.resolve())
    config.stash[_RUN_DIR] = run_dir
    os.environ["LLMCLUSTER_HOME"] = str(new_home(run_dir / "home", models))


_RUN_DIR = pytest.StashKey[Path]()


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    run_dir = config.stash.get(_RUN_DIR, None)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def new_home(root: Path, models: Path | None = None) -> Path:
    """A fresh, empty LLMCLUSTER_HOME at ``root`` whose ``models`` is the run's model
    cache (by default the one the current home links to)."""
    models = models or (Path(os.environ["LLMCLUSTER_HOME"]) / "models").resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


@pytest.fixture(scope="module", autouse=True)
def _module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test module (and the processes its fixtures start) gets its own home."""
    yield from _use_home(new_home(tmp_path_factory.mktemp("home")))


@pytest.fixture(autouse=True)
def _test_home(tmp_path_factory: pytest.TempPathFactory, _module_home: Path) -> Iterator[Path]:
    """Each test (and the processes it starts) gets its own home."""
    yield from _use_home(new_home(tmp_path_factory.mktemp("home")))


def _use_home(home: Path) -> Iterator[Path]:
    previous = os.environ["LLMCLUSTER_HOME"]
    os.environ["LLMCLUSTER_HOME"] = str(home)
    try:
        yield home
    finally:
        os.environ["LLMCLUSTER_HOME"] = previous


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the default model in float32 (exact comparisons)."""
    from common.models import load_model, resolve_model

    return load_model(resolve_model(None), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_model(default_model):
    """A randomly initialised 2-layer Llama with the default model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = default_model
    config = model.config.__class__.from_dict(
        {
            **model.config.to_dict(),
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    torch.manual_seed(0)
    tiny = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny.eval()
    return tiny, tokenizer


@pytest.fixture(scope="module")
def worker_proc():
    """A real ``llmcluster worker`` (default model, float32) for the module."""
    from tests.procs import start_worker

    proc = start_worker("--dtype", "float32", "--worker-id", "test-worker", "--max-running", "16")
    try:
        proc.wait_healthy(timeout_s=300)
        yield proc
    finally:
        proc.stop()

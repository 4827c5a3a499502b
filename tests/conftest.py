"""Shared fixtures: the default model loaded once per session, a tiny random model of
the same architecture and tokenizer for mechanics, and real worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Keep transformers from reaching for a hub during tests: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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

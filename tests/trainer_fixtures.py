"""Fixtures for the trainer and model-store tests (imported by those test modules).

Fixture functions are named ``*_fixture`` and registered under the short name, so a test
module imports ``tiny_model_fixture`` and its tests take ``tiny_model``.

``tiny_model`` is a 2-layer Llama with hidden size 64, randomly initialised, saved
with the default model's tokenizer: real forward and backward passes in milliseconds.
``real_model`` is the default model (SmolLM2-135M-Instruct) for behaviour tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.models import ModelSource, load_tokenizer, resolve_model

DATA_DIR = Path(__file__).parent / "data" / "finetune"


def build_tiny_llama(folder: Path, seed: int = 0) -> ModelSource:
    """Saves a tiny random Llama with the default model's tokenizer into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    default = resolve_model(None)
    tokenizer = load_tokenizer(default)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return ModelSource("tiny-llama", str(folder))


@pytest.fixture(scope="session", name="tiny_model")
def tiny_model_fixture(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    """A tiny random Llama saved on disk (built once per session)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", name="tokenizer")
def tokenizer_fixture():
    """The default model's tokenizer."""
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session", name="real_model")
def real_model_fixture() -> ModelSource:
    """The default model (converted on first use)."""
    return resolve_model(None)


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts, or raw strings written as is) one per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def small_rows(n: int = 24) -> list[dict]:
    """A small prompt/completion dataset for mechanics tests."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]
    return [
        {
            "prompt": f"Word: {words[i % 10]} {i}\nTag:",
            "completion": f" <<{words[i % 10].upper()}-{i}>>",
        }
        for i in range(n)
    ]


@pytest.fixture(name="one_torch_thread")
def one_torch_thread_fixture():
    """Runs a test with one intra-op thread, restoring the setting after.

    Tiny-model matrices are too small to split across threads, and on a busy CI machine
    OpenMP's spinning threads make them ~10x slower than one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

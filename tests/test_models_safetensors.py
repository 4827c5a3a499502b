"""Base models load only from safetensors: a folder holding only a pickled checkpoint
(pytorch_model.bin) is refused with a message that says why and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.models import ModelSource, load_model, resolve_model


def _tiny_llama_folder(folder: Path, *, safe: bool) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if safe:
        model.save_pretrained(str(folder))
    else:  # what older tools wrote: a config and a pickled state dict
        config.save_pretrained(str(folder))
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_model_folder_with_only_a_pytorch_bin_is_refused(tmp_path: Path) -> None:
    folder = _tiny_llama_folder(tmp_path / "pickled", safe=False)
    assert (folder / "pytorch_model.bin").exists()
    assert not list(folder.glob("*.safetensors"))
    source = resolve_model(str(folder))
    with pytest.raises(FileNotFoundError) as info:
        load_model(source, dtype="float32", device="cpu")
    message = str(info.value)
    assert "pytorch_model.bin" in message and "only safetensors are loaded" in message
    assert "safe_serialization=True" in message


def test_an_empty_model_folder_says_it_holds_no_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_model(ModelSource("empty", str(tmp_path / "empty")), dtype="float32", device="cpu")


def test_the_same_model_as_safetensors_loads_and_the_bin_beside_it_is_ignored(
    tmp_path: Path, default_model
) -> None:
    """With both files present the safetensors weights are the ones loaded: the .bin
    next to them is overwritten with different weights and must not matter."""
    folder = _tiny_llama_folder(tmp_path / "safe", safe=True)
    # Other (zeroed) weights as a pickle in the same folder.
    zeroed = LlamaForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    for p in zeroed.parameters():
        p.data.zero_()
    torch.save(zeroed.state_dict(), folder / "pytorch_model.bin")
    _, tokenizer = default_model
    tokenizer.save_pretrained(str(folder))
    model, _ = load_model(ModelSource("safe", str(folder)), dtype="float32", device="cpu")
    reference = LlamaForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert any(p.abs().sum() > 0 for p in model.parameters())

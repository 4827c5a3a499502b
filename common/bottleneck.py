"""Bottleneck adapters (the seed's "adapter tuning", Houlsby et al. 2019): after a decoder
layer's attention block and/or its MLP block, ``out + up(act(down(out)))`` with a small
``down`` (hidden → size) and ``up`` (size → hidden); the base stays frozen.

One module, used by both sides so they compute the same thing:
- the trainer attaches them to an HF Llama-style model with forward hooks
  (:func:`attach`), trains only their weights and saves them (:func:`save`);
- the worker loads an artifact (:func:`load`) and the packed forward applies each row's
  own set to that row's tokens only (:meth:`BottleneckSet.add_to`), so base, LoRA,
  prompt-tuned and bottleneck rows share one batch.

Why our own ~100 lines and not AdapterHub's ``adapters`` package: it pins narrow
transformers versions (ours is newer) and patches the model classes it knows, while the
worker never runs HF's forward on the packed path; what we need is two matrices per block.
``up`` starts at zero, so a fresh adapter is the base model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.bottleneck_spec import CONFIG_FILE, WEIGHTS_FILE, BottleneckSpec, read_spec


class Bottleneck(torch.nn.Module):
    """``x -> up(silu(down(x)))`` (the caller adds it to ``x``)."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(hidden, size)
        self.up = torch.nn.Linear(size, hidden)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.silu(self.down(x)))


def _key(layer: int, block: str) -> str:
    return f"layer{layer}_{block}"


class BottleneckSet(torch.nn.Module):
    """Every bottleneck of one adapter, by (layer, block)."""

    def __init__(self, spec: BottleneckSpec) -> None:
        super().__init__()
        self.spec = spec
        self.adapters = torch.nn.ModuleDict(
            {
                _key(i, block): Bottleneck(spec.hidden_size, spec.size)
                for i in range(spec.num_layers)
                for block in spec.blocks
            }
        )

    def get(self, layer: int, block: str) -> Bottleneck | None:
        key = _key(layer, block)
        return self.adapters[key] if key in self.adapters else None  # type: ignore[return-value]

    def add_to(self, layer: int, block: str, out: torch.Tensor, rows: torch.Tensor) -> None:
        """Adds this set's bottleneck to the ``rows`` of a block's output ``out`` (in place)."""
        module = self.get(layer, block)
        if module is not None:
            picked = out.index_select(0, rows)
            out.index_add_(0, rows, module(picked).to(out.dtype))


def _decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ValueError("bottleneck adapters need a decoder with model.layers (Llama-style)")
    return layers


def spec_for(model: Any, size: int, placement: str) -> BottleneckSpec:
    return BottleneckSpec(
        size=size,
        placement=placement,
        hidden_size=int(model.config.hidden_size),
        num_layers=len(_decoder_layers(model)),
    )


def attach(model: Any, adapter: BottleneckSet) -> list[Any]:
    """Hooks ``adapter`` into the HF model's attention and MLP outputs (training, and the
    reference the tests compare the packed forward with); returns the hook handles. The
    set becomes ``model.bottleneck``, so its parameters are the model's."""
    model.bottleneck = adapter
    handles = []
    for index, layer in enumerate(_decoder_layers(model)):
        attention = adapter.get(index, "attention")
        mlp = adapter.get(index, "mlp")
        if attention is not None:

            def after_attention(_m: Any, _i: Any, out: Any, b: Bottleneck = attention) -> Any:
                hidden = out[0] if isinstance(out, tuple) else out
                hidden = hidden + b(hidden)
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            handles.append(layer.self_attn.register_forward_hook(after_attention))
        if mlp is not None:

            def after_mlp(_m: Any, _i: Any, out: torch.Tensor, b: Bottleneck = mlp) -> Any:
                return out + b(out)

            handles.append(layer.mlp.register_forward_hook(after_mlp))
    return handles


def save(adapter: BottleneckSet, folder: Path, base_model: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {**adapter.spec.to_json(), "base_model_name_or_path": base_model}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def load(folder: Path, device: Any, dtype: torch.dtype) -> BottleneckSet:
    """An artifact's bottlenecks, ready to apply (every tensor checked against the config)."""
    from safetensors.torch import load_file

    adapter = BottleneckSet(read_spec(folder))
    adapter.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)

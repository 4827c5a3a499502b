"""Checkpoints that resume a run exactly, written without pickle.

A checkpoint folder holds:

- ``trainable.safetensors``: every parameter that trains (LoRA / prompt weights, or the
  whole model for a full fine-tune), by ``named_parameters`` name;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors (Adam moments,
  step counts) and its scalars (param groups) — ``state_dict()`` split into what
  safetensors can hold and what JSON can;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states, so dropout continues
  with the same random numbers (a data-parallel run's rank r under ``rank<r>.``);
- ``state.json``: step, config, data fingerprint, eval-before result, grad-scaler scale.

The folder is written beside its final name and renamed into place, so a crash while
saving leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def _tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors that share no storage; clone on CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()}


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into safetensors-able tensors and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return _tensors(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuilds the ``state_dict()`` that :func:`optimizer_to_flat` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    """torch's generator states (CPU and each CUDA device)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(states["cpu"])
    cuda = sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([states[k] for k in cuda])


def save_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes ``root/step-<step>`` atomically and keeps only the ``keep`` newest.
    ``rng``: the generator states to save (default: this process's, :func:`rng_state`)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file(_tensors(trainable), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(_tensors(rng or rng_state()), str(tmp / "rng.safetensors"))
        # state.json last: its presence marks a complete checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: ``root`` is the ``output_dir`` given to
    ``train`` or its ``checkpoints`` folder. None when there is none yet."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint folder: trainable tensors, optimizer state dict, rng, state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": optimizer_from_flat(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text()),
        ),
        "rng": load_file(str(path / "rng.safetensors")),
        "state": json.loads((path / STATE_FILE).read_text()),
    }

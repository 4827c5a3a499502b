"""Adapters served from the model store, several at once in one batch: LoRA (peft's
per-row ``adapter_names``), prompt tuning (the artifact's virtual-token embeddings,
prepended to the row's prompt by the packed forward; the base weights are unchanged, so
the row runs as a base row otherwise) and bottleneck adapters (``common.bottleneck``:
the packed forward adds the row's own bottleneck outputs to its tokens only).

Resolution (``name`` / ``name@latest`` / ``name@3`` → a stored version) happens on the
request path; loading, LRU eviction and the per-row ``adapter_names`` happen on the
engine thread, the only thread that touches the model. Adapters are keyed inside peft by
the sha256 of their weights, so a new version can never be served with old weights, and
two names for the same weights share one copy. Both kinds share one LRU bound.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from common import bottleneck
from common.errors import InvalidArgument, NotFound
from common.model_store import ArtifactRef, ModelStore
from worker.weights import keep_adapter_precision

logger = logging.getLogger(__name__)

BASE_ROW = "__base__"  # peft's name for rows that use no adapter in a mixed batch
SERVABLE_METHODS = ("lora", "prompt_tuning", "bottleneck")
PROMPT_EMBEDDINGS = "prompt_embeddings"  # peft's key for a prompt-tuning artifact's tensor
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def method_of(ref: ArtifactRef) -> str:
    return str(ref.metadata.get("method", "lora")).lower()


class AdapterSet:
    """The adapters loaded into one base model (LRU, bounded)."""

    def __init__(
        self,
        store: ModelStore,
        base_model_name: str,
        max_loaded: int = 8,
        hidden_size: int | None = None,
    ) -> None:
        self.store = store
        self.base_model_name = base_model_name
        self.max_loaded = max_loaded
        self.hidden_size = hidden_size  # the base's embedding width (prompt tuning must match)
        self._loaded: OrderedDict[str, ArtifactRef] = OrderedDict()  # key → ref (LRU)
        # Prompt-tuning artifacts loaded (key → [virtual tokens, hidden]); engine thread only.
        self._prompts: dict[str, torch.Tensor] = {}
        # Virtual-token counts of resolved prompt-tuning artifacts (key → n), any thread.
        self._virtual: dict[str, int] = {}
        # Bottleneck artifacts loaded (key → their modules); engine thread only.
        self._bottlenecks: dict[str, bottleneck.BottleneckSet] = {}
        # The engine thread reorders and edits _loaded while the event loop reports it
        # (Load messages): mutations and snapshots take this lock, nobody iterates live.
        self._lock = threading.Lock()
        self.wrapped = False  # the model is a PeftModel once the first adapter loads

    @staticmethod
    def key_of(ref: ArtifactRef) -> str:
        return f"sha{ref.sha256[:20]}"

    def resolve(self, spec: str, split_key: str | None = None) -> ArtifactRef:
        """``name@version`` / ``name@latest`` → a stored, servable version (any thread);
        a bare name with a traffic split gets the version the split gives ``split_key``."""
        try:
            ref = self.store.resolve(spec, split_key)
        except NotFound as exc:
            raise NotFound(f"adapter {spec}: {exc.args[0]}") from exc  # args: no KeyError quotes
        self._check(ref)
        return ref

    def _check(self, ref: ArtifactRef) -> None:
        """Raises InvalidArgument unless ``ref`` was trained on this base with a method
        served per request, and fits it."""
        base = ref.metadata.get("base_model", "")
        if base and base != self.base_model_name:
            raise InvalidArgument(
                f"adapter {ref.ref} was trained on {base!r}; this worker serves "
                f"{self.base_model_name!r}"
            )
        method = method_of(ref)
        if method not in SERVABLE_METHODS:
            raise InvalidArgument(
                f"adapter {ref.ref} was trained with method {method!r}; only LoRA, "
                "prompt-tuning and bottleneck adapters are served per request (serve a "
                "full fine-tune with --model on its folder)"
            )
        if method == "prompt_tuning":
            self._check_prompt(ref)
        if method == "bottleneck":
            self._check_bottleneck(ref)

    def _check_bottleneck(self, ref: ArtifactRef) -> None:
        """A bottleneck artifact's config must fit this base's width (request path: reads
        the small config file only)."""
        try:
            spec = bottleneck.read_spec(ref.path)
        except ValueError as exc:
            raise InvalidArgument(f"adapter {ref.ref}: {exc}") from None
        if self.hidden_size is not None and spec.hidden_size != self.hidden_size:
            raise InvalidArgument(
                f"adapter {ref.ref}: its bottlenecks are {spec.hidden_size}-wide; "
                f"this base model's hidden size is {self.hidden_size}"
            )

    def _check_prompt(self, ref: ArtifactRef) -> None:
        """A prompt-tuning artifact must hold one ``[n, hidden]`` tensor of this base's
        width; reads the safetensors header only (the request path)."""
        from safetensors import safe_open

        key = self.key_of(ref)
        if key in self._virtual:
            return
        path = ref.path / ADAPTER_WEIGHTS
        try:
            with safe_open(str(path), framework="pt") as f:
                shape = list(f.get_slice(PROMPT_EMBEDDINGS).get_shape())
        except Exception as exc:  # missing file or key, or not safetensors
            raise InvalidArgument(
                f"adapter {ref.ref}: no {PROMPT_EMBEDDINGS} tensor in {ADAPTER_WEIGHTS} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if len(shape) != 2 or shape[0] < 1:
            raise InvalidArgument(
                f"adapter {ref.ref}: {PROMPT_EMBEDDINGS} has shape {shape}; expected "
                "[virtual tokens, hidden size]"
            )
        if self.hidden_size is not None and shape[1] != self.hidden_size:
            raise InvalidArgument(
                f"adapter {ref.ref}: its virtual tokens are {shape[1]}-wide; "
                f"{self.base_model_name!r} embeds tokens in {self.hidden_size}"
            )
        self._virtual[key] = int(shape[0])

    def servable(self, ref: ArtifactRef) -> bool:
        """Whether a request here could use ``ref`` (what ListModels advertises)."""
        try:
            self._check(ref)
        except InvalidArgument:
            return False
        return True

    def virtual_tokens(self, ref: ArtifactRef | None) -> int:
        """Positions a request with ``ref`` has before its prompt (0 unless prompt tuning)."""
        if ref is None or method_of(ref) != "prompt_tuning":
            return 0
        self._check_prompt(ref)
        return self._virtual[self.key_of(ref)]

    def lora_key(self, ref: ArtifactRef | None) -> str | None:
        """The peft adapter name of a LoRA row; None for base and prompt-tuned rows (they
        run the base weights)."""
        if ref is None or method_of(ref) != "lora":
            return None
        return self.key_of(ref)

    def bottleneck_set(self, ref: ArtifactRef | None) -> bottleneck.BottleneckSet | None:
        """The loaded bottlenecks of a bottleneck row (after :meth:`activate`), else None."""
        if ref is None or method_of(ref) != "bottleneck":
            return None
        return self._bottlenecks[self.key_of(ref)]

    def prompt_embeddings(self, ref: ArtifactRef) -> torch.Tensor:
        """The loaded virtual-token embeddings of ``ref`` (after :meth:`activate`)."""
        return self._prompts[self.key_of(ref)]

    def loaded_refs(self) -> list[str]:
        with self._lock:
            return [ref.ref for ref in self._loaded.values()]

    def activate(self, model: Any, ref: ArtifactRef, in_use: set[str]) -> Any:
        """Loads ``ref`` if needed (engine thread); returns the model to use from now on."""
        key = self.key_of(ref)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return model
        path = self.store.load_adapter_dir(ref)  # verifies every checksum first
        while len(self._loaded) >= self.max_loaded:
            victim = next((k for k in self._loaded if k not in in_use), None)
            if victim is None:
                break  # all in use: exceed the bound rather than fail a running batch
            logger.info("unloading adapter %s (LRU)", self._loaded[victim].ref)
            if victim in self._prompts:
                del self._prompts[victim]
            elif victim in self._bottlenecks:
                del self._bottlenecks[victim]
            else:
                model.delete_adapter(victim)
            with self._lock:
                del self._loaded[victim]
        if method_of(ref) == "prompt_tuning":
            self._load_prompt(model, ref, key, path)
        elif method_of(ref) == "bottleneck":
            self._check_bottleneck(ref)
            table = model.get_input_embeddings().weight
            # The model's compute dtype (fp32 on CPU) also on a bf16/int8 --weights base.
            self._bottlenecks[key] = bottleneck.load(path, table.device, table.dtype)
        elif not self.wrapped:
            from peft import PeftModel

            model = PeftModel.from_pretrained(
                model, str(path), adapter_name=key, is_trainable=False
            )
            model.eval()
            self.wrapped = True
        else:
            model.load_adapter(str(path), adapter_name=key, is_trainable=False)
        if method_of(ref) == "lora":
            # On a bf16/int8 base (--weights) the delta keeps the model's compute precision.
            keep_adapter_precision(model, key, model.get_input_embeddings().weight.dtype)
        with self._lock:
            self._loaded[key] = ref
        logger.info("loaded adapter %s (%s)", ref.ref, key)
        return model

    def _load_prompt(self, model: Any, ref: ArtifactRef, key: str, path: Path) -> None:
        from safetensors.torch import load_file

        self._check_prompt(ref)
        table = model.get_input_embeddings().weight
        embeddings = load_file(str(path / ADAPTER_WEIGHTS))[PROMPT_EMBEDDINGS]
        # As peft does: the virtual tokens enter in the embeddings' dtype (the model's).
        self._prompts[key] = embeddings.to(device=table.device, dtype=table.dtype)

    def forward_kwargs(self, adapter_keys: list[str | None]) -> dict[str, Any]:
        """Per-row adapter selection for one forward pass."""
        if not self.wrapped:
            return {}
        return {"adapter_names": [k or BASE_ROW for k in adapter_keys]}

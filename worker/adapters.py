"""LoRA adapters served from the model store, several at once in one batch.

Resolution (``name`` / ``name@latest`` / ``name@3`` → a stored version) happens on the
request path; loading, LRU eviction and the per-row ``adapter_names`` happen on the
engine thread, the only thread that touches the model. Adapters are keyed inside peft by
the sha256 of their weights, so a new version can never be served with old weights, and
two names for the same weights share one copy.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from common.errors import InvalidArgument, NotFound
from common.model_store import ArtifactRef, ModelStore
from worker.weights import keep_adapter_precision

logger = logging.getLogger(__name__)

BASE_ROW = "__base__"  # peft's name for rows that use no adapter in a mixed batch
SERVABLE_METHODS = ("lora",)


class AdapterSet:
    """The adapters loaded into one base model (LRU, bounded)."""

    def __init__(self, store: ModelStore, base_model_name: str, max_loaded: int = 8) -> None:
        self.store = store
        self.base_model_name = base_model_name
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, ArtifactRef] = OrderedDict()  # peft key → ref (LRU)
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
        base = ref.metadata.get("base_model", "")
        if base and base != self.base_model_name:
            raise InvalidArgument(
                f"adapter {ref.ref} was trained on {base!r}; this worker serves "
                f"{self.base_model_name!r}"
            )
        method = str(ref.metadata.get("method", "lora")).lower()
        if method not in SERVABLE_METHODS:
            raise InvalidArgument(
                f"adapter {ref.ref} was trained with method {method!r}; only LoRA adapters "
                "are served per request (serve a full fine-tune with --model on its folder)"
            )
        return ref

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
            model.delete_adapter(victim)
            with self._lock:
                del self._loaded[victim]
        if not self.wrapped:
            from peft import PeftModel

            model = PeftModel.from_pretrained(
                model, str(path), adapter_name=key, is_trainable=False
            )
            model.eval()
            self.wrapped = True
        else:
            model.load_adapter(str(path), adapter_name=key, is_trainable=False)
        # On a bf16/int8 base (--weights) the delta keeps the model's compute precision.
        keep_adapter_precision(model, key, model.get_input_embeddings().weight.dtype)
        with self._lock:
            self._loaded[key] = ref
        logger.info("loaded adapter %s (%s)", ref.ref, key)
        return model

    def forward_kwargs(self, adapter_keys: list[str | None]) -> dict[str, Any]:
        """Per-row adapter selection for one forward pass."""
        if not self.wrapped:
            return {}
        return {"adapter_names": [k or BASE_ROW for k in adapter_keys]}

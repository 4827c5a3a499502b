"""Full fine-tunes served as models of their own: ``GenerateRequest.model = "name@3"``
(or ``name@latest``) names a ``full`` artifact of the model store trained on this
worker's base model. Unlike an adapter it cannot share the base's weights, so the first
request loads the artifact folder into a second :class:`~worker.runtime.ModelRuntime`
(prepared exactly as the base: same dtype, device, ``--weights``), with its own engine
thread and the base engine's compute lock, thread count and fault hook.

Loading runs off the event loop, once per artifact even for concurrent first requests
(they all await one task). At most ``--max-loaded-models`` stay loaded; when another
must load, the least recently used one with no request in flight is stopped; when all
are busy the request gets RESOURCE_EXHAUSTED. Before loading, the artifact's safetensors
bytes are checked against the memory free on its device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import InvalidArgument, NotFound, ResourceExhausted
from common.model_store import ArtifactRef, ModelStore
from worker.adapters import method_of

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.runtime import ModelRuntime

logger = logging.getLogger(__name__)

FULL_METHOD = "full"
HF_CONFIG = "config.json"  # what makes a stored folder loadable as a model
MEMORY_MARGIN = 1.2  # weights + the engine's buffers and activations, roughly
MEMORY_HEADROOM_BYTES = 256 * 1024 * 1024


def is_artifact_spec(model: str) -> bool:
    """Whether ``GenerateRequest.model`` names a store artifact (``name@version`` /
    ``name@latest``) rather than a base model."""
    return "@" in model


def weights_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder`` (what loading it will take, about)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file())


def available_memory_bytes(device: str) -> int:
    """Memory free for new weights on ``device``: CUDA's free memory, else the host's
    MemAvailable (/proc/meminfo)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class FullModels:
    """The full fine-tunes loaded beside one base runtime (LRU, bounded; event loop)."""

    def __init__(self, base: ModelRuntime, store: ModelStore, max_loaded: int) -> None:
        self.base = base
        self.store = store
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, ModelRuntime] = OrderedDict()  # ref → runtime (LRU)
        # One task per artifact being loaded: concurrent first requests await the same one.
        self._loading: dict[str, asyncio.Task[ModelRuntime]] = {}

    def resolve(self, spec: str) -> ArtifactRef:
        """``name@version`` / ``name@latest`` → a stored full fine-tune of this base (any
        thread; reads the store). NOT_FOUND / INVALID_ARGUMENT say why not."""
        try:
            ref = self.store.resolve(spec)
        except NotFound as exc:
            raise NotFound(f"model {spec}: {exc.args[0]}") from exc
        self.check(ref)
        return ref

    def check(self, ref: ArtifactRef) -> None:
        method = method_of(ref)
        if method != FULL_METHOD:
            raise InvalidArgument(
                f"model {ref.ref} is a {method} adapter, not a full fine-tune: send it in "
                f"the adapter field (adapter={ref.ref!r}) with model naming its base"
            )
        base = ref.metadata.get("base_model", "")
        if base and base != self.base.source.name:
            raise InvalidArgument(
                f"model {ref.ref} was fine-tuned from {base!r}; this worker serves "
                f"{self.base.source.name!r}"
            )
        if not (ref.path / HF_CONFIG).is_file():
            raise InvalidArgument(f"model {ref.ref} has no {HF_CONFIG}: not a model folder")

    def servable(self, ref: ArtifactRef) -> bool:
        """Whether ``model=ref.ref`` could be served here (what ListModels advertises)."""
        try:
            self.check(ref)
        except InvalidArgument:
            return False
        return True

    def loaded_refs(self) -> list[str]:
        return list(self._loaded)

    async def runtime_for(self, ref: ArtifactRef, busy: Callable[[Engine], bool]) -> ModelRuntime:
        """The loaded runtime of ``ref``, loading it first if needed (event loop).
        ``busy(engine)``: whether that engine has requests in flight (not evictable)."""
        key = ref.ref
        runtime = self._loaded.get(key)
        if runtime is not None:
            self._loaded.move_to_end(key)
            return runtime
        task = self._loading.get(key)
        if task is None:
            await self._make_room(busy)
            task = asyncio.ensure_future(self._load(ref))
            self._loading[key] = task
        # shield: one caller's cancellation must not cancel the load the others await.
        return await asyncio.shield(task)

    async def _make_room(self, busy: Callable[[Engine], bool]) -> None:
        while len(self._loaded) + len(self._loading) >= self.max_loaded:
            victim = next((k for k, rt in self._loaded.items() if not busy(rt.engine)), None)
            if victim is None:
                raise ResourceExhausted(
                    f"{self.max_loaded} full fine-tune(s) are loaded or loading and all are "
                    f"busy (--max-loaded-models {self.max_loaded}); retry later"
                )
            runtime = self._loaded.pop(victim)
            logger.info("unloading full fine-tune %s (LRU)", victim)
            await asyncio.to_thread(runtime.engine.stop, 5.0)
            runtime.model = None  # the weights go with the last reference

    async def _load(self, ref: ArtifactRef) -> ModelRuntime:
        try:
            runtime = await asyncio.to_thread(self._load_sync, ref)
        finally:
            del self._loading[ref.ref]
        self._loaded[ref.ref] = runtime
        return runtime

    def _load_sync(self, ref: ArtifactRef) -> ModelRuntime:
        """Worker thread: memory check, checksums, then the base's own preparation."""
        from worker.runtime import ModelRuntime

        need = int(weights_bytes(ref.path) * MEMORY_MARGIN) + MEMORY_HEADROOM_BYTES
        free = available_memory_bytes(self.base.device)
        if need > free:
            raise ResourceExhausted(
                f"model {ref.ref}: loading needs about {need / 2**20:.0f} MiB but "
                f"{self.base.device} has {free / 2**20:.0f} MiB free; unload a model or "
                "lower --max-loaded-models"
            )
        folder = self.store.load_adapter_dir(ref)  # verifies every checksum first
        config = dataclasses.replace(self.base.config, model=str(folder))
        runtime = ModelRuntime(config, serve_full_models=False)
        old = self.base.engine
        engine = runtime.engine
        engine.fault_file = old.fault_file
        if old.compute_lock is not None:
            # Its own open file on the same lock file: flock excludes per open file, so
            # the two engines of this process take turns as two workers would.
            from worker.cores import ComputeLock

            engine.compute_lock = ComputeLock(old.compute_lock.path)
        if old.compute_threads is not None:
            engine.set_compute_threads(old.compute_threads)
        engine.start()
        logger.info("loaded full fine-tune %s from %s", ref.ref, folder)
        return runtime

    async def stop(self) -> None:
        for runtime in list(self._loaded.values()):
            await asyncio.to_thread(runtime.engine.stop, 5.0)
        self._loaded.clear()

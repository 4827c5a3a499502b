"""Fine-tuning with no cluster: train on this machine, optionally publish to the store.

``llmcluster finetune --local`` and ``python -m trainer`` call :func:`run_local`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.data import DatasetSource
from trainer.distributed import Ranks
from trainer.events import DoneEvent, TrainEvent
from trainer.train import train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRun:
    """The finished run and, when a name was given, the published ``name@version``."""

    done: DoneEvent
    artifact_ref: str | None = None
    artifact_path: str | None = None
    sha256: str | None = None


def run_local(
    data: DatasetSource,
    *,
    name: str | None = None,
    config: TrainConfig | None = None,
    base_model: str | None = None,
    work_dir: str | Path | None = None,
    store_root: str | Path | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
    resume_from: str | Path | None = None,
    device: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> LocalRun:
    """Trains ``data`` and, if ``name`` is set, publishes the artifact to the model store
    (``store_root``, default ``<llmcluster home>/store``) as the next version of ``name``.

    The name is checked before training so a bad one fails in a second, not after an hour.
    Under torchrun (``torchrun --nproc-per-node N -m trainer ...``) every rank trains its
    share and rank 0 alone publishes.
    """
    store = None
    if name is not None:
        # Imported here: the store pulls in common.errors (grpc), which training alone
        # does not need.
        from common.model_store import ModelStore, validate_name

        validate_name(name)
        store = ModelStore(store_root)
    config = config or TrainConfig()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="llmcluster-train-"))
    done = train(
        config,
        base_model,
        data,
        work,
        on_event=on_event,
        resume_from=resume_from,
        device=device,
    )
    if store is None or name is None or not Ranks.from_env().is_main:
        return LocalRun(done)
    ref = store.publish(name, done.artifact_dir, {**done.metadata, **(metadata or {})})
    logger.info("published %s to %s", ref.ref, store.root)
    return LocalRun(done, ref.ref, str(ref.path), ref.sha256)

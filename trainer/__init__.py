"""Fine-tuning library: data preparation, LoRA / full / prompt-tuning training, export.

Importable and testable with no gRPC: it depends on ``common`` only. The worker runs
:func:`train` in a job process and turns its events into ``JobEvent`` messages;
``python -m trainer`` (and :func:`run_local`) run it with no cluster at all.

Note: ``trainer.train`` is the function; the module's other names are reached with
``from trainer.train import ...``.

Importing the package stays light (no torch, no transformers): the client commands
(``llmcluster finetune list|get|cancel|watch``) read :class:`TrainConfig` from here and
must answer in a fraction of a second. The names that need torch (:func:`train`,
:func:`run_local`, :func:`latest_checkpoint`, :class:`TrainingCancelled`) load on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from trainer.config import DEFAULT_LEARNING_RATES, TrainConfig
from trainer.data import DatasetError, JsonlText, PreparedData, load_examples, prepare_data
from trainer.events import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    TrainEvent,
)

if TYPE_CHECKING:
    from trainer.checkpoint import latest_checkpoint
    from trainer.local import run_local
    from trainer.train import TrainingCancelled, train

# name -> the submodule that defines it (each imports torch).
_HEAVY = {
    "latest_checkpoint": "trainer.checkpoint",
    "run_local": "trainer.local",
    "TrainingCancelled": "trainer.train",
}

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "CheckpointEvent",
    "DatasetError",
    "DoneEvent",
    "EvalEvent",
    "JsonlText",
    "LogEvent",
    "MetricsEvent",
    "PhaseEvent",
    "PreparedData",
    "TrainConfig",
    "TrainEvent",
    "TrainingCancelled",
    "latest_checkpoint",
    "load_examples",
    "prepare_data",
    "run_local",
    "train",
]


def __getattr__(name: str) -> Any:
    """PEP 562: the torch-backed names, imported when first asked for."""
    module = _HEAVY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _TrainerPackage(types.ModuleType):
    """Keeps ``trainer.train`` the function: importing the submodule ``trainer.train``
    makes the import system bind that module on the package under the same name, which
    this property's setter ignores."""

    @property
    def train(self) -> Any:
        from trainer.train import train as train_function

        return train_function

    @train.setter
    def train(self, _submodule: Any) -> None:
        pass


sys.modules[__name__].__class__ = _TrainerPackage

"""Fine-tuning library: data preparation, LoRA / full / prompt-tuning training, export.

Importable and testable with no gRPC: it depends on ``common`` only. The worker runs
:func:`train` in a job process and turns its events into ``JobEvent`` messages;
``python -m trainer`` (and :func:`run_local`) run it with no cluster at all.

Note: ``trainer.train`` is the function; the module's other names are reached with
``from trainer.train import ...``.
"""

from trainer.checkpoint import latest_checkpoint
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
from trainer.local import run_local
from trainer.train import TrainingCancelled, train

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

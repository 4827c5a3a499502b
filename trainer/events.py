"""What a training run reports while it runs: plain dataclasses, no protobuf.

``train(on_event=...)`` receives these in order; the worker's job manager turns each one
into a ``llmcluster.v1.JobEvent`` (PhaseEvent/LogEvent → ``log``, MetricsEvent →
``metrics``, EvalEvent → ``evaluation``, CheckpointEvent → ``checkpoint``); DoneEvent
carries the artifact folder it then publishes to the model store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PhaseEvent:
    """A new phase starts: "data", "load_model", "evaluate", "train", "export"."""

    phase: str
    message: str = ""


@dataclass(frozen=True)
class LogEvent:
    """A human-readable line (data summary, resume notice, warnings)."""

    message: str


@dataclass(frozen=True)
class MetricsEvent:
    """Progress after one optimizer step."""

    step: int
    total_steps: int
    epoch: float  # fractional: 1.5 = half way through the second epoch
    loss: float  # mean token loss of the step's micro-batches
    learning_rate: float  # the rate this step used
    tokens_per_second: float  # non-padding tokens of the step / its wall time


@dataclass(frozen=True)
class EvalEvent:
    """Loss on the eval split: stage "before" or "after" training."""

    stage: str
    eval_loss: float
    perplexity: float
    step: int
    eval_tokens: int = 0


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint folder was written (resume with ``train(resume_from=path)``)."""

    step: int
    path: str


@dataclass(frozen=True)
class DoneEvent:
    """Training finished and the artifact is saved in ``artifact_dir``."""

    artifact_dir: str
    steps: int
    train_loss: float  # loss of the last optimizer step
    eval_before: EvalEvent | None
    eval_after: EvalEvent | None
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


TrainEvent = PhaseEvent | LogEvent | MetricsEvent | EvalEvent | CheckpointEvent | DoneEvent

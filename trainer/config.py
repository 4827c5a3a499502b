"""Hyperparameters of one training run: a typed dataclass with defaults and checks.

The fields mirror ``llmcluster.v1.Hyperparameters`` (finetune.proto) so the worker can
convert one into the other field by field; an unset learning rate takes a default that
depends on the method (see :data:`DEFAULT_LEARNING_RATES`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from common.bottleneck_spec import PLACEMENTS
from common.config import field

METHODS = ("lora", "full", "prompt_tuning", "bottleneck")
LR_SCHEDULERS = ("linear", "cosine", "constant")

# Peak learning rates that learn a small dataset in a few dozen steps without diverging.
# LoRA and prompt tuning follow common practice (QLoRA 2e-4, Lester et al. ~3e-2 with
# Adafactor; AdamW needs less); full fine-tuning of every weight needs ~10x less than LoRA.
# Bottleneck adapters start at the identity (zero up-projection) and train like LoRA at
# a few times its rate (Houlsby et al. 2019 swept 3e-5 .. 3e-3).
DEFAULT_LEARNING_RATES = {"lora": 2e-4, "full": 2e-5, "prompt_tuning": 3e-2, "bottleneck": 1e-3}

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of a fine-tuning run; invalid values raise ValueError naming the field."""

    method: str = field("lora", help="training method: lora, full, prompt_tuning or bottleneck")
    epochs: int = field(3, help="passes over the training set")
    learning_rate: float | None = field(
        None,
        help="peak learning rate; unset: 2e-4 (lora), 2e-5 (full), 3e-2 (prompt_tuning), "
        "1e-3 (bottleneck)",
    )
    lr_scheduler: str = field("linear", help="schedule after warmup: linear, cosine or constant")
    warmup_ratio: float = field(0.05, help="fraction of optimizer steps of linear warmup, [0, 1)")
    weight_decay: float = field(0.0, help="AdamW weight decay (>= 0)")
    batch_size: int = field(8, help="examples per micro-batch")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    max_seq_length: int = field(512, help="longest tokenised example; longer ones are truncated")
    lora_r: int = field(16, help="LoRA rank (> 0)")
    lora_alpha: float = field(32.0, help="LoRA alpha (> 0); the update is scaled by alpha / r")
    lora_dropout: float = field(0.05, help="LoRA dropout in [0, 1)")
    lora_target_modules: list[str] = field(
        default_factory=list, help="module names LoRA adapts; empty: chosen per architecture"
    )
    eval_fraction: float = field(0.1, help="fraction of examples held out for evaluation, [0, 0.5]")
    seed: int = field(
        0, help="seed of the train/eval split, each epoch's order, initialisation and dropout"
    )
    checkpoint_every_steps: int = field(
        0, help="save a checkpoint every N optimizer steps (0: at the end of each epoch)"
    )
    num_virtual_tokens: int = field(20, help="virtual tokens of prompt tuning")
    bottleneck_size: int = field(64, help="width of each bottleneck adapter (> 0)")
    bottleneck_placement: str = field(
        "both", help="where bottleneck adapters go: both, attention or mlp (after that block)"
    )
    max_steps: int = field(0, help="stop after this many optimizer steps (0: no limit)")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0: no clipping)")
    drop_invalid: bool = field(
        False,
        help="drop invalid dataset rows (e.g. a prompt without its completion) and count "
        "them in the dataset summary, instead of refusing the dataset",
    )

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        self.lr_scheduler = str(self.lr_scheduler).lower()
        self.bottleneck_placement = str(self.bottleneck_placement).lower()
        self.lora_target_modules = list(self.lora_target_modules or [])
        if self.learning_rate is None and self.method in DEFAULT_LEARNING_RATES:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.method not in METHODS:
            raise bad("method", f"one of {', '.join(METHODS)}")
        if self.bottleneck_placement not in PLACEMENTS:
            raise bad("bottleneck_placement", f"one of {', '.join(PLACEMENTS)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", f"one of {', '.join(LR_SCHEDULERS)}")
        positive_ints = (
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "lora_r",
            "num_virtual_tokens",
            "bottleneck_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "a positive integer")
        for name in ("checkpoint_every_steps", "max_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, "an integer >= 0")
        if self.max_seq_length < 2:
            raise bad("max_seq_length", ">= 2")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise bad("learning_rate", "a finite number > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", ">= 0")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", "> 0")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "in [0, 1)")
        if not 0 <= self.eval_fraction <= 0.5:
            raise bad("eval_fraction", "in [0, 0.5]")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise bad("max_grad_norm", ">= 0")
        for module in self.lora_target_modules:
            if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
                raise ValueError(
                    f"lora_target_modules must hold module names like 'q_proj', got {module!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The effective hyperparameters as JSON-ready values (for metadata and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, refusing unknown keys (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(unknown)}")
        return cls(**values)

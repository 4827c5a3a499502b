"""A model-free engine for measuring the router + gRPC ceiling (``--engine null``).

It keeps the real engine's scheduling, budgets, cancellation, detokenisation and output
path, and replaces the forward pass with a fixed-period step that "generates" the same
token for every running sequence.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from worker.engine import Engine, EngineConfig, SeqOutput, _Sequence
from worker.sampling import TokenChoice

_NULL_TOKEN_TEXT = " a"


class NullEngine(Engine):
    """Engine without a model: each iteration emits one token per running sequence."""

    def __init__(self, tokenizer: Any, config: EngineConfig, step_s: float = 0.005) -> None:
        self.tokenizer = tokenizer
        self._step_s = step_s
        ids = tokenizer(_NULL_TOKEN_TEXT, add_special_tokens=False)["input_ids"]
        self._token_id = int(ids[-1])
        super().__init__(model=None, tokenizer=tokenizer, config=config)

    def _init_device(self, model: Any) -> torch.device:
        return torch.device("cpu")

    def _choices(self, rows: list[_Sequence]) -> list[TokenChoice]:
        return [TokenChoice(self._token_id, 0.0) for _ in rows]

    def _prefill(self, plan, outputs: dict[int, SeqOutput], sinks) -> None:
        done = [seq for seq, n in plan if self._prompt_done(seq, n)]
        self._rows.extend(done)
        if done:
            self._emit_choices(done, self._choices(done), outputs, sinks)

    def _decode(self, outputs: dict[int, SeqOutput], sinks) -> None:
        time.sleep(self._step_s)  # stands in for the forward pass
        self._emit_choices(self._rows, self._choices(self._rows), outputs, sinks)

    def _remove_rows(self, indices: list[int]) -> None:
        gone = set(indices)
        for i in indices:
            self._reserved_kv -= self._rows[i].req.kv_tokens
        self._rows = [s for i, s in enumerate(self._rows) if i not in gone]

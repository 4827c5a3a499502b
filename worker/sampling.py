"""Per-row token selection: repetition penalty, temperature, top-k, top-p, seeded sampling,
and logprobs with top alternatives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.validation import SamplingParams


@dataclass(frozen=True)
class TokenChoice:
    """One selected token with its logprob and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator per request: the same seed gives the same tokens whatever else runs
    in the batch. Greedy requests need none."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(
        params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    )
    return gen


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # Same rule as transformers' RepetitionPenaltyLogitsProcessor: shrink the score of
    # every token already present in prompt or output.
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen_ids: list[torch.Tensor | None],
) -> list[TokenChoice]:
    """Chooses one token per row of ``logits`` [B, V] under each row's parameters.

    Logprobs are those of the model's raw distribution (before penalty/temperature), so
    they compare across requests with different sampling settings.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    choices: list[TokenChoice] = []
    for row, p in enumerate(params):
        scores = logits[row]
        seen = seen_ids[row]
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            scores = _penalise(scores, seen, p.repetition_penalty)
        if p.greedy:
            token = int(torch.argmax(scores))
        else:
            scores = _filter_top_k_top_p(scores / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generators[row]))
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            values, ids = torch.topk(logprobs[row], p.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        choices.append(TokenChoice(token, float(logprobs[row, token]), top))
    return choices

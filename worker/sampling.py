"""Per-row token selection: repetition penalty, temperature, top-k, top-p, seeded sampling,
and logprobs with top alternatives.

Numerically safe for every finite parameter the validator accepts: scores are float32,
the temperature is clamped into a range where ``logits / t`` stays finite, NaN scores
count as impossible, +inf is clamped, and a distribution that still is not one (no
finite mass left) falls back to the most likely token. A sampling failure can therefore
only come from a bug, and the engine's per-row boundary contains even that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.validation import SamplingParams

# logits / t for float32 logits of any real model stays finite over this range, and
# softmax over it is well defined: below it the distribution is one-hot already, above
# it uniform already (in float32), so clamping changes no result a client could see.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6


@dataclass(frozen=True)
class TokenChoice:
    """One selected token with its logprob and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(
    params: SamplingParams, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A generator per request on the logits' device: the same seed gives the same tokens
    whatever else runs in the batch. Greedy requests need none."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(
        params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    )
    return gen


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # Same rule as transformers' RepetitionPenaltyLogitsProcessor: shrink the score of
    # every token already present in prompt or output.
    seen = seen.to(logits.device)
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sanitise(scores: torch.Tensor) -> torch.Tensor:
    """NaN = impossible; +inf clamped to the largest float so softmax stays defined."""
    big = torch.finfo(scores.dtype).max
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=big)


def sampling_scores(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None
) -> torch.Tensor:
    """The float32 scores of one row [V] that the token is drawn from: penalty, then (when
    sampling) guarded temperature and top-k / top-p. Their log_softmax is the reported
    logprob distribution."""
    scores = _sanitise(logits.float())
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        scores = _sanitise(_penalise(scores, seen, params.repetition_penalty))
    if not params.greedy:
        temperature = min(max(params.temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
        scores = _sanitise(scores / temperature)
        scores = _filter_top_k_top_p(scores, params.top_k, params.top_p)
    if not bool(torch.isfinite(scores).any()):
        # Nothing finite left (a model that produced no finite logit): keep the raw
        # argmax possible rather than dividing by zero mass.
        scores = torch.full_like(scores, float("-inf"))
        scores[int(torch.argmax(_sanitise(logits.float())))] = 0.0
    return scores


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None,
) -> TokenChoice:
    """Chooses one token from one row of logits [V].

    ``logprob`` and ``top`` are log-probabilities (log_softmax) of the distribution the
    token is drawn from: after the repetition penalty and, when sampling, temperature and
    top-k / top-p; greedy rows use temperature 1. Filtered-out alternatives (-inf) are
    not listed.
    """
    scores = sampling_scores(logits, params, seen)
    logprobs = torch.log_softmax(scores, dim=-1)
    if params.greedy:
        token = int(torch.argmax(scores))
    else:
        probs = logprobs.exp()
        probs = probs / probs.sum()  # renormalise: exp(log_softmax) sums to 1 only roughly
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if params.logprobs:
        values, ids = torch.topk(logprobs, min(params.logprobs, logprobs.numel()))
        top = tuple(
            (i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")
        )
    return TokenChoice(token, float(logprobs[token]), top)


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen_ids: list[torch.Tensor | None],
) -> list[TokenChoice]:
    """Chooses one token per row of ``logits`` [B, V] under each row's parameters."""
    return [
        select_token(logits[row], p, generators[row], seen_ids[row]) for row, p in enumerate(params)
    ]

"""Token selection on real logits of the default model: numerically safe for every
parameter the validator accepts, logprobs that are log-probabilities, and the validator's
rejections naming the field."""

from __future__ import annotations

import math
import re

import pytest
import torch

from common.errors import InvalidArgument
from common.pb import generate_pb2
from common.validation import GenerationLimits, SamplingParams
from worker.sampling import make_generator, sampling_scores, select_token


@pytest.fixture(scope="module")
def logits(default_model) -> torch.Tensor:
    """The next-token logits [V] of a real prompt."""
    model, tokenizer = default_model
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


EXTREME = [
    SamplingParams(temperature=1e-40),
    SamplingParams(temperature=5e-324),  # the smallest subnormal double
    SamplingParams(temperature=3.4e38),
    SamplingParams(temperature=1e300),
    SamplingParams(temperature=1e-40, top_p=1e-30),
    SamplingParams(temperature=1.0, top_k=1 << 20),
    SamplingParams(temperature=3.4e38, repetition_penalty=100.0),
    SamplingParams(temperature=0.5, repetition_penalty=0.01),
    SamplingParams(temperature=0.0, repetition_penalty=0.01),
]


@pytest.mark.parametrize("params", EXTREME, ids=lambda p: repr(p)[14:80])
def test_extreme_parameters_sample_a_real_token(logits, params) -> None:
    seen = torch.arange(0, 500)
    choice = select_token(
        logits, params.__class__(**{**params.__dict__, "logprobs": 5}), make_generator(params), seen
    )
    assert 0 <= choice.token_id < logits.numel()
    assert math.isfinite(choice.logprob) and choice.logprob <= 0.0
    assert all(math.isfinite(lp) for _, lp in choice.top)


def test_tiny_temperature_is_greedy_and_huge_temperature_spreads(logits) -> None:
    greedy = int(torch.argmax(logits))
    tiny = SamplingParams(temperature=1e-40, seed=1)
    gen = make_generator(tiny)
    assert {select_token(logits, tiny, gen, None).token_id for _ in range(20)} == {greedy}
    huge = SamplingParams(temperature=3.4e38, seed=1)
    gen = make_generator(huge)
    assert len({select_token(logits, huge, gen, None).token_id for _ in range(20)}) > 10


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(logprobs=20),
        SamplingParams(temperature=0.8, logprobs=20, seed=3),
        SamplingParams(temperature=1.3, top_k=5, logprobs=20, seed=3),
        SamplingParams(temperature=0.7, top_p=0.9, logprobs=10, seed=3),
        SamplingParams(repetition_penalty=1.5, logprobs=4),
    ],
    ids=["greedy", "t0.8", "top_k5", "top_p0.9", "penalty"],
)
def test_logprobs_are_log_probabilities_of_the_sampled_distribution(logits, params) -> None:
    seen = torch.tensor([1, 2, 3, int(torch.argmax(logits))])
    choice = select_token(logits, params, make_generator(params), seen)
    expected = torch.log_softmax(sampling_scores(logits, params, seen), dim=-1)
    assert choice.logprob == pytest.approx(float(expected[choice.token_id]), abs=1e-5)
    assert sum(math.exp(lp) for _, lp in choice.top) <= 1.0 + 1e-5
    ids = [i for i, _ in choice.top]
    assert ids == torch.topk(expected, len(ids)).indices.tolist()
    # The chosen token has probability > 0 under that distribution, and it differs from
    # the raw logits as soon as a temperature or penalty applies (not raw logits either).
    assert choice.logprob > -math.inf
    assert all(lp <= 0 for _, lp in choice.top)
    if params.top_k:
        assert len(choice.top) == params.top_k  # filtered-out tokens are not alternatives


def _pb(**fields) -> generate_pb2.SamplingParams:
    return generate_pb2.SamplingParams(**fields)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (dict(temperature=math.nan), "params.temperature"),
        (dict(temperature=math.inf), "params.temperature"),
        (dict(temperature=-1e-45), "params.temperature"),
        (dict(top_p=math.nan), "params.top_p"),
        (dict(top_p=0.0), "params.top_p"),
        (dict(top_p=1.5), "params.top_p"),
        (dict(repetition_penalty=math.inf), "params.repetition_penalty"),
        (dict(repetition_penalty=1e-40), "params.repetition_penalty"),
        (dict(repetition_penalty=3.4e38), "params.repetition_penalty"),
        (dict(top_k=2**32 - 1), "params.top_k"),
        (dict(logprobs=21), "params.logprobs"),
        (dict(logprobs=2**32 - 1), "params.logprobs"),
        (dict(max_new_tokens=0), "params.max_new_tokens"),
        (dict(max_new_tokens=2**32 - 1), "params.max_new_tokens"),
        (dict(stop=["x"] * 9), "params.stop"),
        (dict(stop=[""]), "params.stop[0]"),
    ],
)
def test_validator_rejects_out_of_range_sampling_naming_the_field(fields, name) -> None:
    with pytest.raises(InvalidArgument, match="^" + re.escape(name) + " "):
        SamplingParams.from_pb(_pb(**fields), GenerationLimits())

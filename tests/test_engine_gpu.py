"""The engine's greedy-equivalence and sampling tests on CUDA (``-m gpu``): the sampling
RNG, the penalty's index tensors and every row's state live on the logits' device.
Skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from tests.test_engine import HOSTILE_SAMPLING, MAX_NEW, PROMPTS, chat_ids
from worker.engine import Engine, EngineConfig, EngineRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_model():
    from common.models import load_model, resolve_model

    return load_model(resolve_model(None), dtype="float32", device="cuda")


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> list[int]:
    ids = chat_ids(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device="cuda"),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(params=[True, False], ids=["packed-step", "staged-step"])
def cuda_engine(request, cuda_model):
    model, tokenizer = cuda_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=16, packed_step=request.param))
    assert eng.device.type == "cuda"
    eng.start()
    yield eng
    eng.stop()


def submit(engine, sink, ids, **params) -> int:
    return engine.submit(EngineRequest(ids, SamplingParams(**params), sink))


def test_cuda_greedy_matches_generate_in_a_batch(cuda_engine, cuda_model) -> None:
    model, tokenizer = cuda_model
    refs = [generate_alone(model, tokenizer, p, MAX_NEW) for p in PROMPTS[:6]]
    sink = CollectingSink()
    keys = [
        submit(cuda_engine, sink, chat_ids(tokenizer, p), max_new_tokens=MAX_NEW)
        for p in PROMPTS[:6]
    ]
    sink.wait_done(keys)
    for prompt, key, ref in zip(PROMPTS, keys, refs, strict=False):
        assert sink.tokens[key] == ref, f"divergence for {prompt!r}"


def test_cuda_repetition_penalty_matches_generate(cuda_engine, cuda_model) -> None:
    model, tokenizer = cuda_model
    ref = generate_alone(model, tokenizer, PROMPTS[6], 16, repetition_penalty=1.3)
    sink = CollectingSink()
    key = submit(
        cuda_engine,
        sink,
        chat_ids(tokenizer, PROMPTS[6]),
        max_new_tokens=16,
        repetition_penalty=1.3,
    )
    sink.wait_done([key])
    assert sink.final[key].error is None, sink.final[key].error
    assert sink.tokens[key] == ref


def test_cuda_seeded_sampling_alone_equals_in_a_batch(cuda_engine, cuda_model) -> None:
    _, tokenizer = cuda_model
    ids = chat_ids(tokenizer, "Write a tiny story about a cat.")
    params = dict(
        max_new_tokens=16,
        temperature=0.9,
        top_p=0.95,
        top_k=40,
        seed=7,
        repetition_penalty=1.1,
        logprobs=3,
    )
    alone = CollectingSink()
    key = submit(cuda_engine, alone, ids, **params)
    alone.wait_done([key])
    assert alone.final[key].error is None, alone.final[key].error
    crowd = CollectingSink()
    others = [
        submit(cuda_engine, crowd, chat_ids(tokenizer, p), max_new_tokens=16) for p in PROMPTS[:4]
    ]
    again = submit(cuda_engine, crowd, ids, **params)
    crowd.wait_done([*others, again])
    assert crowd.tokens[again] == alone.tokens[key]


def test_cuda_extreme_sampling_rows_end_cleanly(cuda_engine, cuda_model) -> None:
    _, tokenizer = cuda_model
    sink = CollectingSink()
    keys = [
        submit(cuda_engine, sink, chat_ids(tokenizer, PROMPTS[3]), max_new_tokens=8, **p)
        for p in HOSTILE_SAMPLING
    ]
    sink.wait_done(keys)
    for key in keys:
        assert sink.final[key].error is None, sink.final[key].error
    assert cuda_engine.alive

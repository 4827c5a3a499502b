"""The continuous-batching engine in-process, on the real default model (fp32) and on a
tiny random model for mechanics."""

from __future__ import annotations

import math
import time

import pytest
import torch

from common.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from worker.cores import ComputeLock
from worker.engine import Engine, EngineConfig, EngineRequest, StepClock

PROMPTS = [
    "What is the capital of France?",
    "写一首关于春天的短诗。",
    "def fibonacci(n):\n    ",
    "Tell me a joke with emojis 😀🎉",
    "Hi",
    "Explain gravity to a child in one long paragraph, with an example from daily life.",
    "1, 2, 3, 4,",
    "東京はどんな都市ですか？絵文字🗼も使って。",
    "SELECT name FROM users WHERE",
]
MAX_NEW = 24


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> list[int]:
    """model.generate(do_sample=False) for one prompt alone: the ground truth."""
    ids = chat_ids(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def references(default_model):
    model, tokenizer = default_model
    return [generate_alone(model, tokenizer, prompt, MAX_NEW) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def column_major_model(default_model):
    """A copy of the default model with the weight layout the worker serves on CPU."""
    import copy

    from worker.cpu_layout import use_column_major_linear_weights

    model, tokenizer = default_model
    served = copy.deepcopy(model)
    assert use_column_major_linear_weights(served) > 0
    return served, tokenizer


@pytest.fixture(
    params=[
        pytest.param((True, False), id="packed-step"),
        # The staged path (non-Llama architectures) runs every test under -m slow; the
        # default run covers it through the chunked-prefill and max-running tests.
        pytest.param((False, False), id="staged-step", marks=pytest.mark.slow),
        pytest.param((True, True), id="packed-step-column-major"),
    ],
)
def engine(request, default_model, column_major_model):
    """The engine on both forward paths (one packed forward per iteration, for Llama
    models; one model.forward per stage, for every other architecture) and with the
    worker's CPU weight layout. References always come from the untouched model."""
    packed, column_major = request.param
    model, tokenizer = column_major_model if column_major else default_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=16, packed_step=packed))
    assert (eng._packed is not None) == packed
    batch_sizes: list[int] = []
    eng.on_step = lambda batch, new: batch_sizes.append(batch)
    eng.batch_sizes = batch_sizes  # type: ignore[attr-defined]
    eng.start()
    yield eng
    eng.stop()


def submit(engine, sink, ids, **params) -> int:
    return engine.submit(EngineRequest(ids, SamplingParams(**params), sink))


def test_greedy_matches_generate_when_joining_a_running_batch(engine, default_model, references):
    _, tokenizer = default_model
    sink = CollectingSink()
    keys = []
    for prompt in PROMPTS:
        key = submit(engine, sink, chat_ids(tokenizer, prompt), max_new_tokens=MAX_NEW)
        keys.append(key)
        sink.min_tokens[key] = 2
        # Gate on the previous request decoding, so the next joins a running batch.
        assert sink.token_events[key].wait(120)
    sink.wait_done(keys)
    assert max(engine.batch_sizes) >= 4, "requests never ran together"
    for prompt, key, ref in zip(PROMPTS, keys, references, strict=True):
        assert sink.tokens[key] == ref, f"divergence for {prompt!r}"
        final = sink.final[key]
        # A sequence cut by LENGTH inside a multi-byte character ends before it.
        expected_text = tokenizer.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
        assert sink.text[key] == expected_text
        assert final.finish_reason in ("EOS", "LENGTH")
        assert final.usage.completion_tokens == len(ref)


def test_cancel_one_of_eight_frees_its_slot_and_others_are_unchanged(
    engine, default_model, references
):
    _, tokenizer = default_model
    sink = CollectingSink()
    keys = [
        submit(engine, sink, chat_ids(tokenizer, p), max_new_tokens=MAX_NEW) for p in PROMPTS[:8]
    ]
    victim = keys[5]  # its reference runs to LENGTH, so it is still running when cancelled
    sink.min_tokens[victim] = 3
    assert sink.token_events[victim].wait(120)
    running_before = engine.stats()["running"]
    engine.cancel(victim, "test")
    assert sink.done_events[victim].wait(30)
    assert isinstance(sink.final[victim].error, Cancelled)
    # The slot is free as soon as the cancel is delivered (same iteration).
    still_running = sum(1 for k in keys if k not in sink.final)
    assert engine.stats()["running"] <= still_running < running_before
    sink.wait_done(keys)
    for key, ref in zip(keys, references[:8], strict=True):
        if key != victim:
            assert sink.tokens[key] == ref
    assert len(sink.tokens[victim]) < MAX_NEW


def test_stop_string_across_token_boundaries(engine, default_model, references):
    _, tokenizer = default_model
    ref_text = tokenizer.decode(references[5], skip_special_tokens=True)
    stop = ref_text[10:17]  # a stop that starts and ends inside tokens, most likely
    sink = CollectingSink()
    key = submit(
        engine, sink, chat_ids(tokenizer, PROMPTS[5]), max_new_tokens=MAX_NEW, stop=(stop,)
    )
    sink.wait_done([key])
    assert sink.final[key].finish_reason == "STOP"
    assert sink.text[key] == ref_text[: ref_text.index(stop)]
    # Token.text agrees with the text: no piece of the stop string, message by message.
    assert not sink.misaligned
    assert "".join(sink.token_texts[key]) == sink.text[key]
    assert all(stop not in t for t in sink.token_texts[key])
    assert len(sink.tokens[key]) == sink.final[key].usage.completion_tokens
    assert sink.tokens[key] == references[5][: len(sink.tokens[key])]


def test_token_texts_add_up_to_the_text_with_multibyte_characters(engine, default_model):
    """Without stop strings too: the token that completes a character carries it."""
    _, tokenizer = default_model
    sink = CollectingSink()
    keys = [
        submit(engine, sink, chat_ids(tokenizer, p), max_new_tokens=MAX_NEW)
        for p in (PROMPTS[1], PROMPTS[3], PROMPTS[7])
    ]
    sink.wait_done(keys)
    assert not sink.misaligned
    for key in keys:
        assert "".join(sink.token_texts[key]) == sink.text[key]
        assert all("\ufffd" not in t for t in sink.token_texts[key])
    assert any(t == "" for key in keys for t in sink.token_texts[key])  # split characters


def test_seed_gives_same_output_alone_and_in_a_batch(engine, default_model):
    _, tokenizer = default_model
    ids = chat_ids(tokenizer, "Write a tiny story about a cat.")
    alone = CollectingSink()
    key = submit(engine, alone, ids, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    alone.wait_done([key])
    crowd = CollectingSink()
    others = [submit(engine, crowd, chat_ids(tokenizer, p), max_new_tokens=16) for p in PROMPTS[:4]]
    again = submit(engine, crowd, ids, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    other_seed = submit(engine, crowd, ids, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=8)
    crowd.wait_done([*others, again, other_seed])
    assert crowd.tokens[again] == alone.tokens[key]
    assert crowd.tokens[other_seed] != alone.tokens[key]


def test_logprobs_and_alternatives(engine, default_model, references):
    _, tokenizer = default_model
    seen = []

    class Sink(CollectingSink):
        def on_outputs(self, step, outputs):
            for out in outputs:
                seen.extend(out.tokens)
            super().on_outputs(step, outputs)

    sink = Sink()
    key = submit(engine, sink, chat_ids(tokenizer, PROMPTS[0]), max_new_tokens=5, logprobs=3)
    sink.wait_done([key])
    assert len(seen) == 5
    for token in seen:
        assert len(token.top) == 3
        assert token.top[0][0] == token.token_id  # greedy: the chosen token is the top one
        assert token.logprob == pytest.approx(token.top[0][2])
        assert token.top[0][2] >= token.top[1][2] >= token.top[2][2]
        assert token.logprob <= 0


PENALTY_PROMPTS = [PROMPTS[6], PROMPTS[3]]
PENALTY = 1.3


@pytest.fixture(scope="module")
def penalty_references(default_model):
    model, tokenizer = default_model
    return [
        generate_alone(model, tokenizer, p, 16, repetition_penalty=PENALTY) for p in PENALTY_PROMPTS
    ]


def test_repetition_penalty_matches_generate_in_a_batch(engine, default_model, penalty_references):
    """The penalty covers prompt and output tokens, as transformers' logits processor
    does; rows with and without it share the batch."""
    _, tokenizer = default_model
    prompts, penalty, refs = PENALTY_PROMPTS, PENALTY, penalty_references
    sink = CollectingSink()
    plain = submit(engine, sink, chat_ids(tokenizer, PROMPTS[0]), max_new_tokens=16)
    keys = [
        submit(engine, sink, chat_ids(tokenizer, p), max_new_tokens=16, repetition_penalty=penalty)
        for p in prompts
    ]
    sink.wait_done([plain, *keys])
    for prompt, key, ref in zip(prompts, keys, refs, strict=True):
        assert sink.tokens[key] == ref, f"divergence for {prompt!r}"
    assert refs[0] != refs[1]


def test_top_k_keeps_samples_among_the_k_most_likely(engine, default_model, references):
    _, tokenizer = default_model
    chosen: dict[int, list] = {}

    class Sink(CollectingSink):
        def on_outputs(self, step, outputs):
            for out in outputs:
                chosen.setdefault(out.key, []).extend(out.tokens)
            super().on_outputs(step, outputs)

    sink = Sink()
    ids = chat_ids(tokenizer, PROMPTS[2])
    # top_k=1 leaves one candidate: any temperature and seed give the greedy tokens.
    one = submit(engine, sink, ids, max_new_tokens=MAX_NEW, temperature=1.5, top_k=1, seed=3)
    sampled = submit(
        engine, sink, ids, max_new_tokens=MAX_NEW, temperature=1.5, top_k=3, seed=3, logprobs=3
    )
    sink.wait_done([one, sampled])
    assert sink.tokens[one] == references[2]
    assert len(chosen[sampled]) == MAX_NEW
    # Logprob alternatives come from the raw distribution: the sample is one of its top 3.
    assert all(t.token_id in [alt[0] for alt in t.top] for t in chosen[sampled])
    assert sink.tokens[sampled] != references[2]  # temperature 1.5 left the greedy path


def test_deadline_and_budgets(default_model):
    model, tokenizer = default_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=1, max_queue=2, max_kv_tokens=300))
    sink = CollectingSink()
    ids = chat_ids(tokenizer, "Hello")
    # Not started yet: nothing drains the queue, so the bound is observable.
    eng.submit(EngineRequest(ids, SamplingParams(max_new_tokens=4), sink))
    past = eng.submit(
        EngineRequest(
            ids, SamplingParams(max_new_tokens=4), sink, deadline_monotonic=time.monotonic()
        )
    )
    with pytest.raises(ResourceExhausted):
        eng.submit(EngineRequest(ids, SamplingParams(max_new_tokens=4), sink))
    with pytest.raises(InvalidArgument, match="KV budget"):
        eng.submit(EngineRequest(ids, SamplingParams(max_new_tokens=400), sink))
    eng.start()
    try:
        sink.wait_done([past])
        assert isinstance(sink.final[past].error, DeadlineExceeded)
    finally:
        eng.stop()


def test_kv_budget_makes_requests_wait_not_fail(tiny_model):
    model, tokenizer = tiny_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=8, max_kv_tokens=120))
    eng.eos_ids = set()  # a random model may say EOS at any time; lengths must be exact
    sink = CollectingSink()
    ids = list(range(100, 140))  # 40 prompt tokens + 20 new = 60 reserved each
    peak = []
    eng.on_step = lambda batch, new: peak.append(batch)
    eng.start()
    try:
        keys = [
            eng.submit(EngineRequest(ids, SamplingParams(max_new_tokens=20), sink))
            for _ in range(5)
        ]
        sink.wait_done(keys)
    finally:
        eng.stop()
    assert max(peak) == 2  # 120 KV tokens hold two sequences at a time
    assert all(len(sink.tokens[k]) == 20 for k in keys)
    assert all(sink.final[k].finish_reason == "LENGTH" for k in keys)
    # Same prompt, greedy: identical outputs whichever batch they ran in.
    assert all(sink.tokens[k] == sink.tokens[keys[0]] for k in keys)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-step", "staged-step"])
def test_max_running_holds_when_many_are_admitted_in_one_iteration(tiny_model, packed):
    model, tokenizer = tiny_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=2, packed_step=packed))
    eng.eos_ids = set()
    sink = CollectingSink()
    running: list[int] = []
    eng.on_step = lambda batch, new: running.append(eng.stats()["running"])
    # Submitted before the engine starts: all six wait for the first iteration, whose
    # prompt-token budget would fit them all.
    keys = [
        eng.submit(EngineRequest(list(range(100, 110)), SamplingParams(max_new_tokens=5), sink))
        for _ in range(6)
    ]
    eng.start()
    try:
        sink.wait_done(keys)
    finally:
        eng.stop()
    assert max(running) == 2
    assert all(len(sink.tokens[k]) == 5 for k in keys)


def test_compute_threads_change_on_the_engine_thread_from_the_next_iteration(tiny_model):
    """What the worker does while a training process shares its cores: the engine's
    forward passes use fewer torch threads, and all of them again once it ends."""
    model, tokenizer = tiny_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=2))
    eng.eos_ids = set()
    threads_seen: list[int] = []

    class ThreadsSink(CollectingSink):
        def on_outputs(self, step, outputs):  # called on the engine thread
            threads_seen.append(torch.get_num_threads())
            super().on_outputs(step, outputs)

    original = torch.get_num_threads()
    eng.start()
    try:
        for threads in (1, original):
            eng.set_compute_threads(threads)
            threads_seen.clear()
            sink = ThreadsSink()
            key = eng.submit(EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=3), sink))
            sink.wait_done([key])
            assert threads_seen and set(threads_seen) == {threads}
    finally:
        eng.set_compute_threads(original)
        eng.stop()
    assert torch.get_num_threads() == original  # this thread's pool was never touched


def test_the_engine_computes_only_while_it_holds_the_compute_lock(tiny_model, tmp_path):
    """Workers sharing the cores (``--compute-lock``): while another holder has the lock
    the engine takes no step; once it is free the request runs to the end."""
    model, tokenizer = tiny_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=2))
    eng.eos_ids = set()
    eng.compute_lock = ComputeLock(str(tmp_path / "cores.lock"))
    other_worker = ComputeLock(str(tmp_path / "cores.lock"))  # its own open file: a peer
    sink = CollectingSink()
    eng.start()
    try:
        with other_worker:
            key = eng.submit(EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=3), sink))
            time.sleep(0.5)  # ample for a 3-token request on the tiny model
            assert eng.step == 0 and key not in sink.tokens
        sink.wait_done([key])
        assert len(sink.tokens[key]) == 3
    finally:
        eng.stop()
        eng.compute_lock.close()
        other_worker.close()


def test_a_rebuilt_engine_keeps_the_hooks_and_the_lowered_thread_count():
    """After a failed self-test the worker swaps in a fresh engine (worker.health); if a
    job is training, the new engine must stay on the cores it was left, not take all."""
    from worker.config import WorkerConfig
    from worker.runtime import ModelRuntime

    runtime = ModelRuntime(WorkerConfig(engine="null", null_step_ms=1.0))  # no model: fast
    old = runtime.engine

    def on_step(rows: int, tokens: int) -> None:
        pass

    old.on_step, old.fault_file = on_step, "/nonexistent/hang"
    old.set_compute_threads(1)
    new = runtime.rebuild_engine(old)
    assert new is not old
    assert (new.on_step, new.fault_file, new.compute_threads) == (on_step, old.fault_file, 1)
    threads_seen: list[int] = []

    class ThreadsSink(CollectingSink):
        def on_outputs(self, step, outputs):  # called on the engine thread
            threads_seen.append(torch.get_num_threads())
            super().on_outputs(step, outputs)

    new.start()
    try:
        sink = ThreadsSink()
        key = new.submit(EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=3), sink))
        sink.wait_done([key])
        assert threads_seen and set(threads_seen) == {1}
    finally:
        new.stop()
    # An engine never lowered comes back with every thread (no count to carry).
    assert runtime.rebuild_engine(runtime._new_engine()).compute_threads is None


HOSTILE_SAMPLING = [
    dict(temperature=1e-40),  # subnormal: logits / t overflows without the guard
    dict(temperature=3.4e38),  # the largest float32
    dict(temperature=1e-40, top_p=1e-30, top_k=1 << 20),
    dict(temperature=2.0, repetition_penalty=100.0, seed=2**64 - 1),
    dict(temperature=3.4e38, repetition_penalty=0.01, top_p=1.0, logprobs=20),
]


def test_extreme_sampling_rows_end_cleanly_and_others_stay_token_identical(
    engine, default_model, references
):
    """Issue 13: temperature 1e-40 / 3.4e38 killed the engine thread; now they sample
    safely beside greedy rows, which stay equal to model.generate."""
    _, tokenizer = default_model
    sink = CollectingSink()
    innocent = [
        submit(engine, sink, chat_ids(tokenizer, p), max_new_tokens=MAX_NEW) for p in PROMPTS[:3]
    ]
    hostile = [
        submit(engine, sink, chat_ids(tokenizer, PROMPTS[3]), max_new_tokens=8, **params)
        for params in HOSTILE_SAMPLING
    ]
    sink.wait_done([*innocent, *hostile])
    assert engine.alive
    for key, ref in zip(innocent, references[:3], strict=True):
        assert sink.tokens[key] == ref
    for key in hostile:
        assert sink.final[key].error is None, sink.final[key].error
        assert 1 <= len(sink.tokens[key]) <= 8


def test_a_row_whose_sampling_raises_ends_alone_and_the_engine_goes_on(
    engine, default_model, references
):
    """The per-row exception boundary: parameters only the validator would reject
    (a negative logprobs count reaches torch.topk and raises there) fail that request
    with INTERNAL; the batch's other rows go on token-identical and the engine lives."""
    import grpc

    _, tokenizer = default_model
    sink = CollectingSink()
    innocent = [
        submit(engine, sink, chat_ids(tokenizer, p), max_new_tokens=MAX_NEW) for p in PROMPTS[:3]
    ]
    for key in innocent:
        assert sink.token_events[key].wait(120)
    broken = [
        submit(engine, sink, chat_ids(tokenizer, "Hi"), temperature=0.7, logprobs=-3),
        submit(engine, sink, chat_ids(tokenizer, "Hi"), logprobs=-1),
    ]
    sink.wait_done([*innocent, *broken])
    for key in broken:
        assert sink.final[key].error is not None
        assert sink.final[key].error.code == grpc.StatusCode.INTERNAL
        assert sink.tokens[key] == []
    for key, ref in zip(innocent, references[:3], strict=True):
        assert sink.tokens[key] == ref
    assert engine.alive
    again = submit(engine, sink, chat_ids(tokenizer, PROMPTS[0]), max_new_tokens=MAX_NEW)
    sink.wait_done([again])
    assert sink.tokens[again] == references[0]


LONG_PROMPT = (
    "Here are my notes from a week of hiking in the mountains. "
    + " ".join(
        f"Day {day}: we walked {day + 9} kilometres, crossed {day % 3 + 1} rivers, saw "
        f"{day * 2} marmots and camped by a lake at {1800 + day * 40} metres."
        for day in range(1, 9)
    )
    + " Summarise the week in two sentences."
)


def chunk_count(engine, prompt_len: int, budget: float | None = None) -> int:
    """Iterations the engine's budget (or ``budget``) takes to prefill a prompt alone."""
    budget = engine.config.max_prefill_tokens_per_step if budget is None else budget
    start, chunks = 0, 0
    while start < prompt_len:
        start += max(1, engine._chunk_within(start, prompt_len, budget))
        chunks += 1
    return chunks


class StepSink(CollectingSink):
    """Also records which keys got an output at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.keys_at_step: dict[int, set[int]] = {}

    def on_outputs(self, step, outputs):
        with self.lock:
            self.keys_at_step.setdefault(step, set()).update(o.key for o in outputs)
        super().on_outputs(step, outputs)

    def first_step(self, key: int) -> int:
        return min(s for s, keys in self.keys_at_step.items() if key in keys)


CHUNKED_RUNNING_PROMPTS = [PROMPTS[5], PROMPTS[2], PROMPTS[6]]


@pytest.fixture(scope="module")
def chunked_references(default_model):
    model, tokenizer = default_model
    long_ref = generate_alone(model, tokenizer, LONG_PROMPT, MAX_NEW)
    refs = [generate_alone(model, tokenizer, p, 40) for p in CHUNKED_RUNNING_PROMPTS]
    assert all(len(r) == 40 for r in refs)  # they run to LENGTH, beyond the prefill
    return long_ref, refs


@pytest.mark.parametrize("packed", [True, False], ids=["packed-step", "staged-step"])
def test_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(
    default_model, chunked_references, packed
):
    """Chunked prefill: the long prompt takes one chunk per iteration (each a step), the
    running rows get a token at every one of those steps, and every output, the chunked
    one included, is token for token model.generate's."""
    model, tokenizer = default_model
    budget = 48
    long_ids = chat_ids(tokenizer, LONG_PROMPT)
    running_prompts = CHUNKED_RUNNING_PROMPTS
    long_ref, refs = chunked_references
    eng = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_running=8,
            packed_step=packed,
            max_prefill_tokens_per_step=budget,
            max_prefill_stall=0,  # the fixed budget: chunk counts are exact
        ),
    )
    assert (eng._packed is not None) == packed
    chunks = chunk_count(eng, len(long_ids))
    assert chunks >= math.ceil(len(long_ids) / budget) >= 4  # several chunks, none over budget
    sink = StepSink()
    admitted_at: list[int] = []
    eng.start()
    try:
        keys = []
        for prompt in running_prompts:
            key = submit(eng, sink, chat_ids(tokenizer, prompt), max_new_tokens=40)
            sink.min_tokens[key] = 2
            keys.append(key)
        for key in keys:
            assert sink.token_events[key].wait(120)
        long_key = eng.submit(
            EngineRequest(
                long_ids,
                SamplingParams(max_new_tokens=MAX_NEW),
                sink,
                on_admitted=lambda: admitted_at.append(eng.step),
            )
        )
        sink.wait_done([*keys, long_key])
    finally:
        eng.stop()
    assert sink.tokens[long_key] == long_ref
    for key, ref in zip(keys, refs, strict=True):
        assert sink.tokens[key] == ref
    # Admitted during step s (counter at s-1 then), its chunks are steps s .. s+chunks-1
    # and its first token comes with the last of them.
    first = sink.first_step(long_key)
    assert first - admitted_at[0] == chunks
    for step in range(admitted_at[0] + 1, first + 1):
        assert set(keys) <= sink.keys_at_step[step], f"running rows skipped step {step}"


def test_step_clock_bounds_the_prompt_budget_by_measured_step_times():
    clock = StepClock()
    assert clock.budget(2.0, 128) == 128  # nothing measured yet: the configured budget
    clock.observe(0.5, decoding=False, prefill_cost=100)  # prompt-only: not the streams' pace
    assert clock.decode_s is None
    clock.observe(0.040, decoding=True, prefill_cost=0)
    clock.observe(0.040 + 64 * 0.002, decoding=True, prefill_cost=64)
    assert clock.decode_s == pytest.approx(0.040)
    assert clock.prefill_unit_s == pytest.approx(0.002)
    # A step with prompt work may add (stall - 1) decode steps: 0.040 s / 0.002 s per unit.
    assert clock.budget(2.0, 128) == pytest.approx(20)
    assert clock.budget(3.0, 32) == 32  # never above the configured budget
    assert clock.budget(1.1, 128) == StepClock.MIN_BUDGET  # a long prompt still gets in
    assert clock.budget(0, 128) == 128  # 0: the fixed budget alone
    clock.observe(0.080, decoding=True, prefill_cost=0)  # the machine got slower: it follows
    assert 0.040 < clock.decode_s < 0.080


def test_step_clock_learns_the_prompt_unit_only_from_steps_with_enough_prompt_work():
    """A few prompt tokens carry a chunk's fixed cost: learning from them inflated the unit
    cost, shrank the budget and kept every later chunk small."""
    clock = StepClock()
    clock.observe(0.040, decoding=True, prefill_cost=0)
    clock.observe(0.040 + 64 * 0.002, decoding=True, prefill_cost=64)
    for _ in range(20):  # 16-unit chunks whose steps took 40 ms more than a decode step
        clock.observe(0.080, decoding=True, prefill_cost=StepClock.MIN_BUDGET)
    assert clock.prefill_unit_s == pytest.approx(0.002)
    assert clock.budget(2.0, 128) == pytest.approx(20)


def tiny_engine(tiny_model, **config) -> Engine:
    """An engine on the tiny random model that never stops at EOS (4 running rows)."""
    model, tokenizer = tiny_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=4, **config))
    eng.eos_ids = set()
    return eng


class _FrozenClock(StepClock):
    """The stall bound's budget fixed at ``units`` (observations ignored)."""

    def __init__(self, units: float) -> None:
        super().__init__()
        self.decode_s, self.prefill_unit_s = units * 0.001, 0.001

    def observe(self, elapsed_s: float, decoding: bool, prefill_cost: float) -> None:
        pass


def test_stall_bound_shrinks_prompt_chunks_only_while_rows_decode(tiny_model):
    """Beside decoding rows a long prompt gets the clock's budget per step (20 units with
    stall 2); alone, the configured one (128)."""
    eng = tiny_engine(tiny_model, max_prefill_tokens_per_step=128, max_prefill_stall=2.0)
    eng.clock = _FrozenClock(20)
    sink = StepSink()
    long_ids = list(range(100, 500))
    eng.start()
    try:
        alone = eng.submit(EngineRequest(long_ids, SamplingParams(max_new_tokens=1), sink))
        sink.wait_done([alone])
        assert sink.first_step(alone) == chunk_count(eng, len(long_ids))  # 128 per step
        runner = submit(eng, sink, [5, 6, 7], max_new_tokens=400)
        sink.min_tokens[runner] = 2
        assert sink.token_events[runner].wait(60)
        start = eng.step
        beside = eng.submit(EngineRequest(long_ids, SamplingParams(max_new_tokens=1), sink))
        sink.wait_done([beside])
        eng.cancel(runner, "test done")
        sink.wait_done([runner])
    finally:
        eng.stop()
    steps = sink.first_step(beside) - start
    assert steps >= chunk_count(eng, len(long_ids), 20) > 2 * chunk_count(eng, len(long_ids))


def test_a_lone_prompt_prefills_chunk_after_chunk_without_waiting_for_work(tiny_model):
    """Mid-prefill, the engine has work: it must not block on its control queue between
    chunks (it did, 0.5 s per chunk after the first: the TTFT of every prompt longer than
    one chunk on an otherwise idle worker)."""
    eng = tiny_engine(tiny_model, max_prefill_tokens_per_step=16, max_prefill_stall=0)
    blocked_while_prefilling: list[int] = []
    drain = eng._drain_control

    def watched_drain(block: bool):
        if block and eng._prefilling:
            blocked_while_prefilling.append(len(eng._prefilling))
        return drain(block)

    eng._drain_control = watched_drain  # type: ignore[method-assign]
    sink = StepSink()
    long_ids = list(range(100, 200))
    assert chunk_count(eng, len(long_ids)) > 4
    eng.start()
    try:
        key = eng.submit(EngineRequest(long_ids, SamplingParams(max_new_tokens=2), sink))
        sink.wait_done([key])
    finally:
        eng.stop()
    assert len(sink.tokens[key]) == 2
    assert blocked_while_prefilling == []


def test_short_request_overtakes_a_long_prefill_and_a_cancel_frees_it(tiny_model, tmp_path):
    """A short prompt admitted while a long one is mid-prefill gets its first token before
    the long one does (one iteration, not the rest of the prefill: the self-test probe
    is such a request); a cancel mid-prefill ends it and frees its KV reservation."""
    eng = tiny_engine(tiny_model, max_prefill_tokens_per_step=8, max_prefill_stall=0)
    hold = tmp_path / "hold"
    eng.fault_file = str(hold)  # the engine waits at the next iteration while it exists
    sink = StepSink()
    long_ids = list(range(100, 300))
    assert chunk_count(eng, len(long_ids)) > 20
    eng.start()
    try:
        long_key = eng.submit(
            EngineRequest(long_ids, SamplingParams(max_new_tokens=3), sink, on_admitted=hold.touch)
        )
        deadline = time.monotonic() + 60
        while not hold.exists():  # engine thread: admitted, first chunk under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        short_key = submit(eng, sink, [5, 6, 7], max_new_tokens=3)
        hold.unlink()
        sink.wait_done([short_key, long_key])
        assert sink.first_step(short_key) < sink.first_step(long_key)
        assert len(sink.tokens[long_key]) == 3

        victim = eng.submit(
            EngineRequest(long_ids, SamplingParams(max_new_tokens=3), sink, on_admitted=hold.touch)
        )
        while not hold.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert eng.stats()["running"] == 1  # prefilling holds a slot
        eng.cancel(victim, "test")
        hold.unlink()
        sink.wait_done([victim])
        assert isinstance(sink.final[victim].error, Cancelled)
        assert sink.tokens[victim] == []
        stats = eng.stats()
        assert stats["running"] == 0 and stats["free_kv_tokens"] == stats["max_kv_tokens"]
    finally:
        eng.fault_file = None
        eng.stop()


@pytest.mark.parametrize("stall", [float("nan"), -1.0, 0.5, 1.0])
def test_a_stall_bound_that_cannot_hold_is_refused_at_start(stall):
    from worker.config import WorkerConfig

    with pytest.raises(ValueError, match="max_prefill_stall must be 0 \\(off\\) or > 1"):
        WorkerConfig(engine="null", max_prefill_stall=stall)
    assert WorkerConfig(engine="null", max_prefill_stall=0).max_prefill_stall == 0

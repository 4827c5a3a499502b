"""Prompt-tuning artifacts served per row: the artifact's virtual-token embeddings are
prepended to the row's prompt inside the shared (packed) forward. A prompt-tuned row
gives what peft's own ``PeftModel.generate`` gives on the same artifact, and a batch of
base, LoRA and prompt-tuned rows gives each row what it gives alone."""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidArgument
from common.model_store import ModelStore
from common.models import DEFAULT_MODEL, load_model, resolve_model
from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from tests.test_adapters import make_lora
from worker.adapters import AdapterSet
from worker.engine import Engine, EngineConfig, EngineRequest

PROMPTS = ["The weather today is", "Once upon a time"]
MAX_NEW = 8


def make_prompt_tuning(base, out_dir, seed: int, virtual_tokens: int) -> None:
    """A prompt-tuning artifact on the base model, saved by peft (as the trainer does):
    virtual tokens initialised from sampled vocabulary rows, then moved off them, so the
    output differs from the base model's."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        table = peft_model.prompt_encoder["default"].embedding.weight
        table.add_(0.02 * torch.randn_like(table))
    peft_model.save_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, _ = load_model(resolve_model(None), dtype="float32")
    store = ModelStore(tmp_path_factory.mktemp("store"))
    lora = tmp_path_factory.mktemp("lora")
    make_lora(model, lora, seed=1)
    store.publish("style", lora, {"base_model": DEFAULT_MODEL, "method": "lora"})
    for name, seed, n in (("soft-a", 1, 6), ("soft-b", 2, 3)):
        folder = tmp_path_factory.mktemp(name)
        make_prompt_tuning(load_model(resolve_model(None), dtype="float32")[0], folder, seed, n)
        store.publish(name, folder, {"base_model": DEFAULT_MODEL, "method": "prompt_tuning"})
    return store


def start_engine(store, **config):
    model, tokenizer = load_model(resolve_model(None), dtype="float32")
    hidden = model.config.hidden_size
    adapters = AdapterSet(store, DEFAULT_MODEL, max_loaded=3, hidden_size=hidden)
    eng = Engine(model, tokenizer, EngineConfig(**config), adapters=adapters)
    eng.start()
    return eng, tokenizer, adapters


@pytest.fixture(scope="module")
def engine(store):
    eng, tokenizer, adapters = start_engine(store)
    yield eng, tokenizer, adapters
    eng.stop()


def run(eng, tokenizer, adapters, jobs):
    """Submits (prompt, adapter ref or None) jobs together; returns their token lists."""
    sink = CollectingSink()
    keys = [
        eng.submit(
            EngineRequest(
                tokenizer(p)["input_ids"],
                SamplingParams(max_new_tokens=MAX_NEW),
                sink,
                adapter=ref,
                virtual_tokens=adapters.virtual_tokens(ref),
            )
        )
        for p, ref in jobs
    ]
    sink.wait_done(keys)
    for k in keys:
        assert sink.final[k].error is None, sink.final[k].error
    usage = [sink.final[k].usage for k in keys]
    for (p, _), u in zip(jobs, usage, strict=True):
        assert u is not None and u.prompt_tokens == len(tokenizer(p)["input_ids"])
    return [sink.tokens[k] for k in keys]


@pytest.fixture(scope="module")
def peft_reference(store):
    """Greedy tokens of peft's PeftModel.generate on each prompt-tuning artifact."""
    from peft import PeftModel

    _, tokenizer = load_model(resolve_model(None), dtype="float32")
    out: dict[tuple[str, str], list[int]] = {}
    for name in ("soft-a", "soft-b"):
        base, _ = load_model(resolve_model(None), dtype="float32")
        peft_model = PeftModel.from_pretrained(base, str(store.resolve(name).path)).eval()
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.inference_mode():
                tokens = peft_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=MAX_NEW,
                    do_sample=False,
                )
            out[(name, prompt)] = tokens[0, ids.shape[1] :].tolist()
    return out


def test_prompt_tuned_rows_match_peft(engine, peft_reference):
    eng, tokenizer, adapters = engine
    for name in ("soft-a", "soft-b"):
        ref = adapters.resolve(f"{name}@1")
        for prompt in PROMPTS:
            got = run(eng, tokenizer, adapters, [(prompt, ref)])[0]
            assert got == peft_reference[(name, prompt)], (name, prompt)


@pytest.mark.parametrize(
    "config",
    [
        # Chunked prefill: a chunk of 4 splits the 6 virtual tokens across chunks.
        {"max_prefill_tokens_per_step": 4, "max_prefill_stall": 0},
        # The generic path (one model.forward per stage, inputs_embeds for the prefix).
        {"packed_step": False},
    ],
    ids=["chunked", "generic"],
)
def test_chunked_and_generic_paths_match_peft(store, peft_reference, config):
    eng, tokenizer, adapters = start_engine(store, **config)
    try:
        ref = adapters.resolve("soft-a")
        got = run(eng, tokenizer, adapters, [(p, ref) for p in PROMPTS])
        assert got == [peft_reference[("soft-a", p)] for p in PROMPTS]
    finally:
        eng.stop()


def test_mixed_batch_of_base_lora_and_prompt_tuned_rows(engine, peft_reference):
    eng, tokenizer, adapters = engine
    refs = [None, adapters.resolve("style"), adapters.resolve("soft-a"), adapters.resolve("soft-b")]
    jobs = [(p, ref) for p in PROMPTS for ref in refs]
    alone = [run(eng, tokenizer, adapters, [job])[0] for job in jobs]
    together = run(eng, tokenizer, adapters, jobs)
    assert together == alone
    for i in range(0, len(jobs), len(refs)):  # each artifact really changes the output
        assert len({tuple(t) for t in alone[i : i + len(refs)]}) == len(refs), alone
    for (p, ref), tokens in zip(jobs, alone, strict=True):
        if ref is not None and ref.name.startswith("soft"):
            assert tokens == peft_reference[(ref.name, p)]
    assert sorted(adapters.loaded_refs()) == ["soft-a@1", "soft-b@1", "style@1"]


def test_virtual_tokens_count_in_the_kv_budget(engine):
    eng, tokenizer, adapters = engine
    ref = adapters.resolve("soft-a")
    ids = tokenizer(PROMPTS[0])["input_ids"]
    req = EngineRequest(
        ids, SamplingParams(max_new_tokens=4), CollectingSink(), adapter=ref, virtual_tokens=6
    )
    assert req.kv_tokens == 6 + len(ids) + 4
    assert req.prompt_slice(4, 8) == [0, 0, *ids[:2]]
    assert req.prompt_slice(0, 4) == [0, 0, 0, 0]
    assert req.prompt_slice(7, 9) == ids[1:3]


def test_artifacts_for_another_model_are_invalid(store, tmp_path):
    from safetensors.torch import save_file

    narrow = tmp_path / "narrow"
    narrow.mkdir()
    save_file({"prompt_embeddings": torch.zeros(4, 8)}, str(narrow / "adapter_model.safetensors"))
    store.publish("narrow", narrow, {"base_model": DEFAULT_MODEL, "method": "prompt_tuning"})
    adapters = AdapterSet(store, DEFAULT_MODEL, hidden_size=576)
    with pytest.raises(InvalidArgument, match="8-wide.*576"):
        adapters.resolve("narrow")
    with pytest.raises(InvalidArgument, match="trained on"):
        AdapterSet(store, "some-other-model", hidden_size=576).resolve("soft-a")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({"other": torch.zeros(2, 576)}, str(empty / "adapter_model.safetensors"))
    store.publish("no-prompt", empty, {"base_model": DEFAULT_MODEL, "method": "prompt_tuning"})
    with pytest.raises(InvalidArgument, match="no prompt_embeddings"):
        adapters.resolve("no-prompt")

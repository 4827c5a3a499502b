"""LoRA adapters from the model store served per row: base, adapter A and adapter B in
flight together each give what the same request gives alone."""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidArgument, NotFound
from common.model_store import ModelStore
from common.models import DEFAULT_MODEL, load_model, resolve_model
from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from worker.adapters import AdapterSet
from worker.engine import Engine, EngineConfig, EngineRequest

PROMPTS = ["The weather today is", "Once upon a time"]


def make_lora(base, out_dir, seed: int) -> None:
    """A random (non-zero) LoRA on the base model, saved in PEFT format."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out_dir))
    peft_model.unload()  # leave the base model as it was


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, _ = load_model(resolve_model(None), dtype="float32")
    store = ModelStore(tmp_path_factory.mktemp("store"))
    for name, seed in (("style-a", 1), ("style-b", 2)):
        folder = tmp_path_factory.mktemp(name)
        make_lora(model, folder, seed)
        store.publish(name, folder, {"base_model": DEFAULT_MODEL, "method": "lora"})
    return store


@pytest.fixture(scope="module")
def engine(store):
    # A private model: peft injects LoRA layers into the module it wraps.
    model, tokenizer = load_model(resolve_model(None), dtype="float32")
    adapters = AdapterSet(store, DEFAULT_MODEL, max_loaded=2)
    eng = Engine(model, tokenizer, EngineConfig(), adapters=adapters)
    eng.start()
    yield eng, tokenizer, adapters
    eng.stop()


def run(eng, tokenizer, jobs):
    """Submits (prompt, adapter ref or None) jobs together; returns their token lists."""
    sink = CollectingSink()
    keys = [
        eng.submit(
            EngineRequest(
                tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=8), sink, adapter=ref
            )
        )
        for p, ref in jobs
    ]
    sink.wait_done(keys)
    for k in keys:
        assert sink.final[k].error is None, sink.final[k].error
    return [sink.tokens[k] for k in keys]


def test_mixed_batch_matches_each_request_alone(engine):
    eng, tokenizer, adapters = engine
    a, b = adapters.resolve("style-a"), adapters.resolve("style-b@1")
    jobs = [(p, ref) for p in PROMPTS for ref in (None, a, b)]
    alone = [run(eng, tokenizer, [job])[0] for job in jobs]
    together = run(eng, tokenizer, jobs)
    assert together == alone
    # The adapters really change the output (random non-zero LoRA weights).
    for i in range(0, len(jobs), 3):
        assert alone[i] != alone[i + 1] and alone[i] != alone[i + 2]
    assert sorted(adapters.loaded_refs()) == ["style-a@1", "style-b@1"]


def test_new_version_is_served_not_the_old_weights(engine, store, tmp_path):
    eng, tokenizer, adapters = engine
    old = adapters.resolve("style-a")
    first = run(eng, tokenizer, [(PROMPTS[0], old)])[0]
    model, _ = load_model(resolve_model(None), dtype="float32")
    make_lora(model, tmp_path / "v2", seed=3)
    store.publish("style-a", tmp_path / "v2", {"base_model": DEFAULT_MODEL, "method": "lora"})
    new = adapters.resolve("style-a")  # latest
    assert new.version == old.version + 1
    second = run(eng, tokenizer, [(PROMPTS[0], new)])[0]
    pinned = run(eng, tokenizer, [(PROMPTS[0], adapters.resolve(f"style-a@{old.version}"))])[0]
    assert second != first and pinned == first
    assert len(adapters.loaded_refs()) <= 2  # LRU bound held


def test_unknown_or_unservable_adapters(store):
    adapters = AdapterSet(store, DEFAULT_MODEL)
    with pytest.raises(NotFound, match="nope"):
        adapters.resolve("nope")
    with pytest.raises(NotFound, match="style-a@99"):
        adapters.resolve("style-a@99")
    other_base = AdapterSet(store, "some-other-model")
    with pytest.raises(InvalidArgument, match="trained on"):
        other_base.resolve("style-b")

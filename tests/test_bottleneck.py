"""Bottleneck adapters (adapter tuning): trained by the trainer with only their weights
trainable, and served per row by the packed forward. A bottleneck row gives what the HF
model with the same modules hooked in gives (the training-time computation), and a batch
of base, LoRA, prompt-tuned and bottleneck rows gives each row what it gives alone."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from common import bottleneck
from common.errors import InvalidArgument
from common.model_store import ModelStore
from common.models import DEFAULT_MODEL, load_model, resolve_model
from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from tests.test_adapters import make_lora
from tests.test_prompt_tuning import make_prompt_tuning
from tests.trainer_fixtures import (  # noqa: F401  (fixtures)
    one_torch_thread_fixture,
    small_rows,
    tiny_model_fixture,
)
from trainer import TrainConfig, train
from worker.adapters import AdapterSet
from worker.engine import Engine, EngineConfig, EngineRequest
from worker.jobs import hyperparameters_to_config

PROMPTS = ["The weather today is", "Once upon a time"]
MAX_NEW = 8


def make_bottleneck(base, folder: Path, seed: int, placement: str, size: int = 8) -> None:
    """A bottleneck artifact with random (non-zero) up-projections, saved as the trainer
    saves one, so its rows differ from the base model's."""
    torch.manual_seed(seed)
    adapter = bottleneck.BottleneckSet(bottleneck.spec_for(base, size, placement))
    with torch.no_grad():
        for module in adapter.adapters.values():
            module.up.weight.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    bottleneck.save(adapter, folder, DEFAULT_MODEL)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, _ = load_model(resolve_model(None), dtype="float32")
    store = ModelStore(tmp_path_factory.mktemp("store"))
    lora = tmp_path_factory.mktemp("lora")
    make_lora(model, lora, seed=1)
    store.publish("style", lora, {"base_model": DEFAULT_MODEL, "method": "lora"})
    soft = tmp_path_factory.mktemp("soft")
    make_prompt_tuning(load_model(resolve_model(None), dtype="float32")[0], soft, 1, 3)
    store.publish("soft", soft, {"base_model": DEFAULT_MODEL, "method": "prompt_tuning"})
    for name, seed, placement in (("neck-both", 1, "both"), ("neck-mlp", 2, "mlp")):
        folder = tmp_path_factory.mktemp(name)
        make_bottleneck(model, folder, seed, placement)
        store.publish(name, folder, {"base_model": DEFAULT_MODEL, "method": "bottleneck"})
    return store


def start_engine(store, **config):
    model, tokenizer = load_model(resolve_model(None), dtype="float32")
    adapters = AdapterSet(store, DEFAULT_MODEL, max_loaded=4, hidden_size=576)
    eng = Engine(model, tokenizer, EngineConfig(**config), adapters=adapters)
    eng.start()
    return eng, tokenizer, adapters


@pytest.fixture(scope="module")
def engine(store):
    eng, tokenizer, adapters = start_engine(store)
    yield eng, tokenizer, adapters
    eng.stop()


def submit_all(eng, tokenizer, adapters, jobs):
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
    return [sink.final[k].error for k in keys], [sink.tokens[k] for k in keys]


def run(eng, tokenizer, adapters, jobs):
    errors, tokens = submit_all(eng, tokenizer, adapters, jobs)
    assert errors == [None] * len(jobs), errors
    return tokens


@pytest.fixture(scope="module")
def hooked_reference(store):
    """Greedy tokens of the HF model with each artifact's modules hooked in (as trained)."""
    _, tokenizer = load_model(resolve_model(None), dtype="float32")
    out: dict[tuple[str, str], list[int]] = {}
    for name in ("neck-both", "neck-mlp"):
        model, _ = load_model(resolve_model(None), dtype="float32")
        adapter = bottleneck.load(store.resolve(name).path, "cpu", torch.float32)
        bottleneck.attach(model, adapter)
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.inference_mode():
                tokens = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=MAX_NEW,
                    do_sample=False,
                )
            out[(name, prompt)] = tokens[0, ids.shape[1] :].tolist()
    return out


def test_bottleneck_rows_match_the_hooked_hf_model(engine, hooked_reference):
    eng, tokenizer, adapters = engine
    for name in ("neck-both", "neck-mlp"):
        ref = adapters.resolve(f"{name}@1")
        for prompt in PROMPTS:
            assert (
                run(eng, tokenizer, adapters, [(prompt, ref)])[0]
                == hooked_reference[(name, prompt)]
            ), (name, prompt)


def test_mixed_batch_of_base_lora_prompt_and_bottleneck_rows(engine, hooked_reference):
    eng, tokenizer, adapters = engine
    names = [None, "style", "soft", "neck-both", "neck-mlp"]
    refs = [None if n is None else adapters.resolve(n) for n in names]
    jobs = [(p, ref) for p in PROMPTS for ref in refs]
    alone = [run(eng, tokenizer, adapters, [job])[0] for job in jobs]
    together = run(eng, tokenizer, adapters, jobs)
    assert together == alone
    for i in range(0, len(jobs), len(refs)):  # each artifact really changes the output
        assert len({tuple(t) for t in alone[i : i + len(refs)]}) == len(refs), alone
    for (p, ref), tokens in zip(jobs, alone, strict=True):
        if ref is not None and ref.name.startswith("neck"):
            assert tokens == hooked_reference[(ref.name, p)]


def test_chunked_prefill_matches(store, hooked_reference):
    eng, tokenizer, adapters = start_engine(
        store, max_prefill_tokens_per_step=2, max_prefill_stall=0
    )
    try:
        ref = adapters.resolve("neck-both")
        got = run(eng, tokenizer, adapters, [(p, ref) for p in PROMPTS])
        assert got == [hooked_reference[("neck-both", p)] for p in PROMPTS]
    finally:
        eng.stop()


def test_generic_path_refuses_bottleneck_rows_only(store):
    eng, tokenizer, adapters = start_engine(store, packed_step=False)
    try:
        ref = adapters.resolve("neck-both")
        errors, tokens = submit_all(
            eng, tokenizer, adapters, [(PROMPTS[0], ref), (PROMPTS[0], None)]
        )
        assert errors[0] is not None and errors[0].code == grpc.StatusCode.FAILED_PRECONDITION
        assert "bottleneck" in errors[0].message
        assert errors[1] is None and len(tokens[1]) == MAX_NEW
    finally:
        eng.stop()


def test_bad_bottleneck_artifacts_are_invalid(store, tmp_path):
    adapters = AdapterSet(store, DEFAULT_MODEL, hidden_size=576)
    narrow = tmp_path / "narrow"
    tiny_base, _ = load_model(resolve_model(None), dtype="float32")
    make_bottleneck(tiny_base, narrow, 3, "both")
    config = json.loads((narrow / bottleneck.CONFIG_FILE).read_text())
    config["hidden_size"] = 64
    (narrow / bottleneck.CONFIG_FILE).write_text(json.dumps(config))
    store.publish("neck-narrow", narrow, {"base_model": DEFAULT_MODEL, "method": "bottleneck"})
    with pytest.raises(InvalidArgument, match="64-wide.*576"):
        adapters.resolve("neck-narrow")
    broken = tmp_path / "broken"
    make_bottleneck(tiny_base, broken, 4, "mlp")
    (broken / bottleneck.CONFIG_FILE).write_text('{"size": "x"}')
    store.publish("neck-broken", broken, {"base_model": DEFAULT_MODEL, "method": "bottleneck"})
    with pytest.raises(InvalidArgument, match="no usable"):
        adapters.resolve("neck-broken")
    assert not adapters.servable(store.resolve("neck-broken"))
    assert adapters.servable(store.resolve("neck-both"))


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_trains_only_the_bottlenecks_and_exports_them(tiny_model, tmp_path):
    config = TrainConfig(
        method="bottleneck",
        epochs=2,
        bottleneck_size=4,
        bottleneck_placement="attention",
        batch_size=4,
        max_seq_length=32,
        eval_fraction=0.2,
    )
    events: list = []
    done = train(config, tiny_model, small_rows(), tmp_path / "job", on_event=events.append)
    folder = Path(done.artifact_dir)
    spec = bottleneck.read_spec(folder)
    assert (spec.size, spec.placement, spec.hidden_size) == (4, "attention", 64)
    adapter = bottleneck.load(folder, "cpu", torch.float32)
    assert set(adapter.adapters) == {f"layer{i}_attention" for i in range(spec.num_layers)}
    assert any(m.up.weight.abs().sum() > 0 for m in adapter.adapters.values())  # trained
    assert done.eval_after.eval_loss < done.eval_before.eval_loss
    assert any("bottleneck: " in getattr(e, "message", "") for e in events)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": -3}, "bottleneck_size"),
        ({"bottleneck_placement": "everywhere"}, "bottleneck_placement"),
        ({"bottleneck_placement": ""}, "bottleneck_placement"),
    ],
)
def test_bad_bottleneck_hyperparameters_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(method="bottleneck", **values)


def test_hyperparameters_from_the_wire_are_checked():
    from common.pb import finetune_pb2

    hp = finetune_pb2.Hyperparameters(bottleneck_size=0, bottleneck_placement="mlp")
    with pytest.raises(InvalidArgument, match="bottleneck_size"):
        hyperparameters_to_config("bottleneck", hp)
    hp = finetune_pb2.Hyperparameters(bottleneck_placement="sideways")
    with pytest.raises(InvalidArgument, match="bottleneck_placement"):
        hyperparameters_to_config("bottleneck", hp)
    config = hyperparameters_to_config("bottleneck", finetune_pb2.Hyperparameters())
    assert (config.bottleneck_size, config.bottleneck_placement) == (64, "both")
    assert config.learning_rate == 1e-3

"""Serving a full fine-tune: a real ``full`` job on the default model publishes an HF
folder into the store; ``model="name@version"`` (and ``name@latest``) then answers on a
worker serving that base, loaded once on first use (concurrent first requests share the
load), greedy tokens equal to HF ``generate`` on the artifact folder; and through a
router. Unknown versions are NOT_FOUND, an adapter named as model= is INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import safetensors.torch
import torch

from common.model_store import ModelStore
from common.pb import finetune_pb2, finetune_pb2_grpc, generate_pb2, generate_pb2_grpc
from tests.procs import Proc, start_router
from tests.test_finetune import small_hp, small_jsonl, start, states, temp_home, watch_all

PROMPT = "Text: Kofi (45) works in Lagos.\nRecord:"
MAX_NEW = 8


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return temp_home(tmp_path_factory.mktemp("full-home"))


@pytest.fixture(scope="module")
def worker(home: Path) -> Iterator[Proc]:
    proc = start(home, "--max-loaded-models", "1", "--fault-file", str(home / "hang"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gen(worker: Proc) -> Iterator[generate_pb2_grpc.GenerateStub]:
    with grpc.insecure_channel(worker.address) as ch:
        yield generate_pb2_grpc.GenerateStub(ch)


@pytest.fixture(scope="module")
def full_ref(worker: Proc, home: Path) -> str:
    """A real two-step full fine-tune of the default model, trained by the worker."""
    with grpc.insecure_channel(worker.address) as ch:
        ft = finetune_pb2_grpc.FineTuneStub(ch)
        job = ft.CreateJob(
            finetune_pb2.CreateJobRequest(
                method=finetune_pb2.FULL,
                output_name="full-bot",
                dataset_jsonl=small_jsonl(12),
                hyperparameters=small_hp(max_steps=2, eval_fraction=0.0, learning_rate=1e-3),
            ),
            timeout=60,
        )
        events = watch_all(ft, job.job_id)
    assert states(events)[-1] == "SUCCEEDED", events[-1]
    artifact = next(e.artifact for e in events if e.WhichOneof("event") == "artifact")
    assert artifact.ref == "full-bot@1"
    return artifact.ref


def greedy(gen, model: str, prompt: str = PROMPT) -> list[int]:
    reply = gen.Generate(
        generate_pb2.GenerateRequest(
            prompt=prompt,
            model=model,
            params=generate_pb2.SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, logprobs=1),
        ),
        timeout=180,
    )
    assert reply.usage.completion_tokens == len(reply.tokens) > 0
    return [t.id for t in reply.tokens]


def hf_greedy(folder: Path, prompt: str = PROMPT) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def test_full_finetune_is_served_as_its_own_model(gen, full_ref: str, home: Path) -> None:
    # Concurrent first requests: one load, every answer the same.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: greedy(gen, full_ref), range(3)))
    assert answers[0] == answers[1] == answers[2]
    expected = hf_greedy(home / "store" / "full-bot" / "1")
    assert answers[0] == expected
    assert greedy(gen, "full-bot@latest") == expected
    base = greedy(gen, "")
    assert base != expected  # two steps at lr 1e-3 moved the weights: a different model

    listed = gen.ListModels(generate_pb2.ListModelsRequest(), timeout=10).models
    entry = next(m for m in listed if m.name == "full-bot")
    assert entry.method == "full" and entry.version == "1"
    assert entry.base_model == "SmolLM2-135M-Instruct"


def test_bad_model_specs_say_why(gen, full_ref: str, home: Path, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        greedy(gen, "full-bot@7")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7 of full-bot not found" in (err.value.details() or "")

    with pytest.raises(grpc.RpcError) as err:
        greedy(gen, "no-such-model@1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    store = ModelStore(home / "store")
    src = tmp_path / "lora"
    src.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(src / "adapter_model.safetensors"))
    store.publish("lora-bot", src, {"base_model": "SmolLM2-135M-Instruct", "method": "lora"})
    with pytest.raises(grpc.RpcError) as err:
        greedy(gen, "lora-bot@1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter field" in (err.value.details() or "")

    other = tmp_path / "other"
    other.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"))
    (other / "config.json").write_text("{}")
    store.publish("other-bot", other, {"base_model": "SomeOtherModel", "method": "full"})
    with pytest.raises(grpc.RpcError) as err:
        greedy(gen, "other-bot@1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fine-tuned from 'SomeOtherModel'" in (err.value.details() or "")

    # The worker is still healthy and serving both kinds of model.
    assert greedy(gen, full_ref) == greedy(gen, full_ref)


def test_one_loaded_model_is_swapped_when_idle_and_kept_when_busy(
    gen, full_ref: str, home: Path
) -> None:
    """--max-loaded-models 1: a second full fine-tune waits for nothing when the first
    is busy (RESOURCE_EXHAUSTED) and replaces it when idle; the first then reloads."""
    store = ModelStore(home / "store")
    store.republish(store.resolve(full_ref), "full-twin")
    expected = greedy(gen, full_ref)  # loaded now
    hang = home / "hang"
    hang.touch()  # the engines stop stepping: a request stays in flight on full-bot@1
    try:
        stream = gen.GenerateStream(
            generate_pb2.GenerateRequest(
                prompt=PROMPT,
                model=full_ref,
                params=generate_pb2.SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0),
            ),
            timeout=180,
        )
        stream.initial_metadata()  # headers leave once the request is queued
        with pytest.raises(grpc.RpcError) as err:
            greedy(gen, "full-twin@1")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-loaded-models 1" in (err.value.details() or "")
    finally:
        hang.unlink()
    assert list(stream)[-1].usage.completion_tokens > 0  # the busy one went on
    assert greedy(gen, "full-twin@1") == expected  # full-bot@1 was idle: swapped out
    assert greedy(gen, full_ref) == expected  # and back


def test_full_finetune_through_the_router(worker: Proc, gen, full_ref: str, home: Path) -> None:
    router = start_router([worker.address], env={"LLMCLUSTER_HOME": str(home)})
    try:
        router.wait_healthy(timeout_s=60)
        with grpc.insecure_channel(router.address) as ch:
            via_router = greedy(generate_pb2_grpc.GenerateStub(ch), full_ref)
    finally:
        router.stop()
    assert via_router == greedy(gen, full_ref)


def test_router_policy_prefers_the_worker_with_the_full_finetune_loaded() -> None:
    from router.policy import WorkerState, eligible

    a = WorkerState("a:1", healthy=True, models=("base",), queued_tokens=0)
    b = WorkerState(
        "b:1", healthy=True, models=("base",), queued_tokens=999,
        loaded_adapters=frozenset({"full-bot@2"}),
    )  # fmt: skip
    assert a.serves("full-bot@2") and not a.serves("other-base")
    assert eligible("full-bot@2", "", [a, b]) == [b]
    assert eligible("full-bot@latest", "", [a, b]) == [b]
    assert eligible("full-bot@3", "", [a, b]) == [a, b]  # nobody has it: any may load it


def test_loading_more_than_free_memory_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory check runs before any weight is read: a load that needs more than the
    host has free is refused with how much it needs and how much there is."""
    import types

    from common.errors import ResourceExhausted
    from worker import full_models

    folder = tmp_path / "big"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(1024)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    store = ModelStore(tmp_path / "store")
    ref = store.publish("big-bot", folder, {"base_model": "base", "method": "full"})
    assert full_models.weights_bytes(ref.path) > 4096
    free = full_models.available_memory_bytes("cpu")
    assert free > 0
    monkeypatch.setattr(full_models, "MEMORY_HEADROOM_BYTES", 2 * free)
    base = types.SimpleNamespace(device="cpu", source=types.SimpleNamespace(name="base"))
    models = full_models.FullModels(base, store, 1)  # type: ignore[arg-type]
    assert models.resolve("big-bot@latest") == ref
    with pytest.raises(ResourceExhausted, match="MiB free"):
        models._load_sync(ref)

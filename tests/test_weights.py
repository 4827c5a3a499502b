"""Weight precision (``--weights``, issue 19): bf16 and int8 matrices under fp32
activations, LoRA on top per row, the quality bar on the real default model, and a worker
process serving with int8 weights."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import torch

from benchmarks.precision import HELDOUT, agreement, greedy, perplexity
from common.model_store import ModelStore
from common.models import DEFAULT_MODEL, load_model, resolve_model
from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.validation import SamplingParams
from tests.engine_helpers import CollectingSink
from tests.procs import REPO_ROOT, start_worker
from tests.test_adapters import make_lora
from worker.adapters import AdapterSet
from worker.engine import Engine, EngineConfig, EngineRequest
from worker.weights import LowPrecisionLinear, prepare_for_serving, resolve_weights

PROMPTS = ["The weather today is", "Once upon a time", "def fibonacci(n):"]


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.02), ("int8", 0.03), ("int4", 0.1)])
def test_low_precision_linear_is_close_to_the_fp32_layer(precision, tolerance):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)
    x = torch.randn(3, 5, 96)
    low = LowPrecisionLinear(linear, precision)
    with torch.inference_mode():
        want, got = linear(x), low(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    rel = (got - want).norm() / want.norm()
    assert rel < tolerance, float(rel)
    stored = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[precision]
    assert low.weight.dtype == stored
    assert low.weight.numel() * low.weight.element_size() < linear.weight.numel() * 4 / 1.9


def test_int4_reproduces_a_q4_1_grid_and_skips_odd_widths():
    """Weights already on a 4-bit grid of 32-column groups (the default model ships as
    GGUF Q4_1) come back up to the bf16 rounding of scales, zeros and output only; a layer
    whose width is not a multiple of 32 keeps its precision."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        step = torch.rand(32, 2, 1) * 0.01 + 0.001
        low = torch.randn(32, 2, 1) * 0.05
        codes = torch.randint(0, 16, (32, 2, 32)).float()
        codes[..., 0], codes[..., 1] = 0, 15  # each group spans its full range
        linear.weight.copy_((codes * step + low).reshape(32, 64))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        rel = (LowPrecisionLinear(linear, "int4")(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.01, float(rel)  # vs ~0.05 for 4-bit codes of arbitrary weights
    odd = torch.nn.Sequential()
    odd.q_proj = torch.nn.Linear(48, 16)
    odd.k_proj = torch.nn.Linear(64, 16)
    from worker.weights import convert_weights

    assert convert_weights(odd, "int4") == 1
    assert type(odd.q_proj) is torch.nn.Linear and isinstance(odd.k_proj, LowPrecisionLinear)


def test_resolve_weights_and_bad_values():
    assert resolve_weights("auto", torch.float32) == "fp32"
    assert resolve_weights("auto", torch.bfloat16) == "bf16"
    assert resolve_weights("int8", torch.bfloat16) == "int8"
    with pytest.raises(ValueError, match="needs --dtype float32"):
        resolve_weights("fp32", torch.bfloat16)
    with pytest.raises(ValueError, match="weights must be one of"):
        resolve_weights("int3", torch.float32)
    out = subprocess.run(
        [sys.executable, "-m", "llmcluster", "worker", "--weights", "int3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "weights must be one of" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def fp32_model():
    model, tokenizer = load_model(resolve_model(None), dtype="float32")
    prepare_for_serving(model, "fp32")
    return model, tokenizer


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_perplexity_within_the_bar_and_greedy_agreement_measured(fp32_model, precision):
    """Perplexity on the held-out text within 3% of fp32 (issue 19's bar). Greedy
    agreement is measured and must be above chance-level drift, not asserted at the 90% bar:
    on this small model per-channel int8 keeps fp32's first 16 tokens on about 20% of the
    prompts and bf16 on 75-90% (benchmarks/precision.py reports it; the issue's note)."""
    reference, tokenizer = fp32_model
    model, _ = load_model(resolve_model(None), dtype="float32")
    assert prepare_for_serving(model, precision) == precision
    text = HELDOUT.read_text()
    base_ppl, ppl = perplexity(reference, tokenizer, text), perplexity(model, tokenizer, text)
    assert ppl / base_ppl - 1 <= 0.03, (base_ppl, ppl)
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS[:2]]
    want, got = greedy(reference, tokenizer, prompts, 8), greedy(model, tokenizer, prompts, 8)
    # The first greedy token of every prompt survives the rounding (later ones may drift).
    assert agreement(want, got, 1) == 1.0, (want, got)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, _ = load_model(resolve_model(None), dtype="float32")
    store = ModelStore(tmp_path_factory.mktemp("store"))
    folder = tmp_path_factory.mktemp("style-a")
    make_lora(model, folder, seed=1)
    store.publish("style-a", folder, {"base_model": DEFAULT_MODEL, "method": "lora"})
    return store


def _run(eng, tokenizer, jobs):
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


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_lora_on_a_low_precision_base_per_row(store, precision):
    """Base and LoRA rows in one batch start as they do alone; the adapter changes the
    output, and its matrices keep fp32 (peft would cast them to the base's bf16).

    Not token-identical over all 8 tokens: the bf16/int8 kernels round differently for a
    6-row matmul than for a 1-row one, and greedy decoding of this small model follows
    such differences at near ties (seen: one row of six differs from its 6th token on).
    fp32 is token-identical (tests/test_adapters.py)."""
    model, tokenizer = load_model(resolve_model(None), dtype="float32")
    prepare_for_serving(model, precision)
    adapters = AdapterSet(store, DEFAULT_MODEL, max_loaded=2)
    eng = Engine(model, tokenizer, EngineConfig(), adapters=adapters)
    eng.start()
    try:
        ref = adapters.resolve("style-a")
        jobs = [(p, r) for p in PROMPTS for r in (None, ref)]
        alone = [_run(eng, tokenizer, [job])[0] for job in jobs]
        together = _run(eng, tokenizer, jobs)
        assert [t[:3] for t in together] == [t[:3] for t in alone], (together, alone)
        assert all(alone[i] != alone[i + 1] for i in range(0, len(jobs), 2))
        lora_dtypes = {p.dtype for n, p in eng.model.named_parameters() if "lora_" in n}
        assert lora_dtypes == {torch.float32}, lora_dtypes
    finally:
        eng.stop()


def test_worker_serves_with_int8_weights(store):
    worker = start_worker(
        "--weights", "int8", "--store-dir", str(store.root), "--self-test-interval-s", "0"
    )
    try:
        worker.wait_healthy(300)
        with grpc.insecure_channel(worker.address) as channel:
            info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=30)
            assert info.weights == "int8" and info.dtype == "float32"
            stub = generate_pb2_grpc.GenerateStub(channel)
            replies = [
                stub.Generate(
                    generate_pb2.GenerateRequest(
                        prompt="The weather today is",
                        adapter=adapter,
                        params=generate_pb2.SamplingParams(max_new_tokens=6, ignore_eos=True),
                    ),
                    timeout=120,
                )
                for adapter in ("", "style-a", "")
            ]
        assert all(r.usage.completion_tokens == 6 for r in replies)
        assert replies[0].text == replies[2].text != replies[1].text
        assert "weights int8" in worker.output()
    finally:
        worker.stop()

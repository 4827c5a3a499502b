"""Structured output (params.constraint): validation, compilation and the engine's masks
on the default model, and the same through router + worker processes."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from common.errors import InvalidArgument
from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.validation import (
    MAX_CONSTRAINT_CHARS,
    ConstraintSpec,
    GenerationLimits,
    SamplingParams,
    generation_spec_from_pb,
)
from tests.engine_helpers import CollectingSink
from tests.test_engine import chat_ids, generate_alone
from worker.constraints import ConstraintCompiler, RowMatcher, mask_rows
from worker.engine import Engine, EngineConfig, EngineRequest

# Nested object, enum, integer range, array of strings; bounded lengths keep outputs
# within max_new_tokens on a 135M model.
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"enum": ["shipped", "pending", "lost"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["status", "quantity", "tags", "address"],
    "additionalProperties": False,
}
ISO_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ("positive", "negative", "neutral")
ORDER_PROMPTS = [
    "Describe order 1 (a lamp) as JSON.",
    "Give the status of my parcel to Berlin as JSON.",
    "Order 7: three books, shipped. JSON please.",
    "Summarise this order as JSON: 2 chairs sent to Lyon.",
    "JSON for a lost package of 5 mugs.",
    "Return the order details as JSON.",
    "Make up an order record in JSON.",
    "Order status for 12 pens to Oslo, as JSON.",
    "JSON: pending order, 4 lamps, city Rome.",
    "Encode this order: 9 cups, shipped to Madrid.",
]
FREE_PROMPTS = ["What is the capital of France?", "1, 2, 3, 4,"]
LIMITS = GenerationLimits()


def schema_constraint() -> generate_pb2.Constraint:
    return generate_pb2.Constraint(json_schema=json.dumps(ORDER_SCHEMA))


def request_pb(
    constraint: generate_pb2.Constraint | None = None, prompt: str = "hi", **params
) -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(**params)
    if constraint is not None:
        sampling.constraint.CopyFrom(constraint)
    return generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role="user", content=prompt)], params=sampling
    )


def check_order(text: str) -> None:
    jsonschema.validate(json.loads(text), ORDER_SCHEMA)


# ----- validation (router and worker share it) -------------------------------------------

MALFORMED = [
    (generate_pb2.Constraint(), "params.constraint is set but empty"),
    (generate_pb2.Constraint(json_object=False), "params.constraint.json_object must be true"),
    (generate_pb2.Constraint(regex=""), "params.constraint.regex is empty"),
    (generate_pb2.Constraint(json_schema="  "), "params.constraint.json_schema is empty"),
    (
        generate_pb2.Constraint(grammar="x" * (MAX_CONSTRAINT_CHARS + 1)),
        f"at most {MAX_CONSTRAINT_CHARS}",
    ),
    (generate_pb2.Constraint(choice=generate_pb2.Choices()), "must hold 1 to"),
    (
        generate_pb2.Constraint(choice=generate_pb2.Choices(options=["a", ""])),
        "params.constraint.choice.options[1] must be 1 to",
    ),
]


@pytest.mark.parametrize(("constraint", "message"), MALFORMED)
def test_malformed_constraints_are_invalid_argument_naming_the_field(constraint, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        generation_spec_from_pb(request_pb(constraint), LIMITS)


def test_constraints_pass_validation_unchanged():
    spec = generation_spec_from_pb(request_pb(schema_constraint()), LIMITS)
    assert spec.params.constraint == ConstraintSpec("json_schema", json.dumps(ORDER_SCHEMA))
    choice = generate_pb2.Constraint(choice=generate_pb2.Choices(options=list(CHOICES)))
    spec = generation_spec_from_pb(request_pb(choice), LIMITS)
    assert spec.params.constraint == ConstraintSpec("choice", choices=CHOICES)
    assert generation_spec_from_pb(request_pb(), LIMITS).params.constraint is None


# ----- compiler ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler(default_model):
    model, tokenizer = default_model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return ConstraintCompiler(tokenizer, vocab, sorted(Engine._eos_ids(model, tokenizer)))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (ConstraintSpec("json_schema", '{"type": "objekt"}'), 'Unsupported type "objekt"'),
        (ConstraintSpec("json_schema", "{not json"), "Failed to parse JSON"),
        (
            ConstraintSpec("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'),
            "minimum greater than maximum",
        ),
        (ConstraintSpec("regex", "([0-9]"), "regex"),
        (ConstraintSpec("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
    ],
)
def test_a_document_that_does_not_compile_names_the_problem(compiler, spec, problem):
    with pytest.raises(InvalidArgument) as info:
        compiler.compile(spec)
    message = str(info.value)
    assert message.startswith(f"params.constraint.{spec.kind} does not compile: ")
    assert problem.lower() in message.lower()
    assert "/project/cpp" not in message  # the C++ source location is stripped


def test_compiled_once_per_distinct_constraint_lru(default_model):
    model, tokenizer = default_model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    small = ConstraintCompiler(tokenizer, vocab, [2], cache_size=2)
    a, b, c = (ConstraintSpec("regex", r) for r in ("a+", "b+", "c+"))
    first = small.compile(a)
    assert small.compile(ConstraintSpec("regex", "a+")) is first  # equal spec, same object
    assert small.compiled_total == 1
    small.compile(b)
    small.compile(a)  # a is now the most recent; c evicts b
    small.compile(c)
    assert small.compiled_total == 3 and len(small) == 2
    assert small.compile(a) is first
    small.compile(b)
    assert small.compiled_total == 4


def test_choice_with_quotes_and_unicode_accepts_exactly_the_options(compiler, default_model):
    _, tokenizer = default_model
    options = ('say "yes"', "naïve\\path", "日本")
    compiled = compiler.compile(ConstraintSpec("choice", choices=options))
    for option in options:
        matcher = RowMatcher(compiled)
        for tok in tokenizer.encode(option):
            matcher.accept(tok)
        matcher.accept(2)  # the end-of-sequence token completes it
        assert matcher.complete
    matcher = RowMatcher(compiled)
    with pytest.raises(RuntimeError, match="violates"):
        for tok in tokenizer.encode("maybe"):
            matcher.accept(tok)


def test_mask_rows_masks_only_constrained_rows(compiler, default_model):
    import torch

    model, _ = default_model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    logits = torch.randn(3, vocab)
    before = logits.clone()
    matcher = RowMatcher(compiler.compile(ConstraintSpec("regex", "[0-9]+")))
    masked = mask_rows(logits, [None, matcher, None])
    assert set(masked) == {1}
    row = masked[1]
    assert isinstance(row, torch.Tensor)
    allowed = torch.isfinite(row).nonzero().flatten().tolist()
    assert allowed and all(_decode(default_model, t).isdigit() for t in allowed)
    assert torch.equal(logits, before)  # nobody's logits changed in place


def _decode(default_model, token_id: int) -> str:
    return str(default_model[1].decode([token_id]))


# ----- engine on the default model --------------------------------------------------------


@pytest.fixture(scope="module")
def engine(default_model):
    model, tokenizer = default_model
    eng = Engine(model, tokenizer, EngineConfig(max_running=16))
    eng.start()
    yield eng
    eng.stop()


def run_batch(engine, tokenizer, items):
    """items: (prompt, SamplingParams, compiled constraint or None); one batch."""
    sink = CollectingSink()
    keys = [
        engine.submit(EngineRequest(chat_ids(tokenizer, p), params, sink, constraint=c))
        for p, params, c in items
    ]
    sink.wait_done(keys, timeout_s=900)
    return (
        [sink.final[k] for k in keys],
        [sink.tokens[k] for k in keys],
        [sink.text[k] for k in keys],
    )


def test_mixed_batch_constrained_rows_obey_and_free_rows_are_token_identical(
    engine, compiler, default_model
):
    model, tokenizer = default_model
    schema = ConstraintSpec("json_schema", json.dumps(ORDER_SCHEMA))
    date = ConstraintSpec("regex", ISO_DATE)
    choice = ConstraintSpec("choice", choices=CHOICES)
    items = []
    for i, prompt in enumerate(ORDER_PROMPTS[:4]):
        params = SamplingParams(max_new_tokens=96, constraint=schema)
        if i % 2:  # sampled rows, seeded
            params = SamplingParams(
                max_new_tokens=96, temperature=0.9, top_p=0.95, seed=i, constraint=schema
            )
        items.append((prompt, params, compiler.compile(schema)))
    items.append(
        ("When did the order ship?", SamplingParams(max_new_tokens=16, constraint=date), None)
    )
    items.append(
        (
            "Sentiment of 'I love it':",
            SamplingParams(max_new_tokens=8, temperature=0.7, seed=3, constraint=choice),
            None,
        )
    )
    # ignore_eos: the completed constraint itself ends the row, with STOP.
    items.append(
        (
            "Sentiment of 'meh':",
            SamplingParams(max_new_tokens=8, ignore_eos=True, constraint=choice),
            None,
        )
    )
    items = [(p, s, c if c is not None else compiler.compile(s.constraint)) for p, s, c in items]
    for prompt in FREE_PROMPTS:
        items.append((prompt, SamplingParams(max_new_tokens=24, logprobs=2), None))
    finals, tokens, texts = run_batch(engine, tokenizer, items)
    assert all(f.error is None for f in finals), [f.error for f in finals]
    for final, text in zip(finals[:4], texts[:4], strict=True):
        assert final.finish_reason in ("EOS", "STOP"), (final.finish_reason, text)
        check_order(text)
    assert re.fullmatch(ISO_DATE, texts[4]), texts[4]
    assert texts[5] in CHOICES and texts[6] in CHOICES, texts[5:7]
    assert finals[6].finish_reason == "STOP"
    for prompt, got in zip(FREE_PROMPTS, tokens[7:], strict=True):
        assert got == generate_alone(model, tokenizer, prompt, 24)


class TokenSink(CollectingSink):
    """Also keeps every TokenOut (with its logprobs)."""

    def __init__(self) -> None:
        super().__init__()
        self.token_outs: list = []

    def on_outputs(self, step, outputs):
        for out in outputs:
            self.token_outs.extend(out.tokens)
        super().on_outputs(step, outputs)


def test_constrained_logprobs_are_of_the_masked_distribution(engine, compiler, default_model):
    import math

    _, tokenizer = default_model
    choice = ConstraintSpec("choice", choices=("yes", "no"))
    sink = TokenSink()
    params = SamplingParams(max_new_tokens=4, logprobs=5, constraint=choice)
    compiled = compiler.compile(choice)
    key = engine.submit(
        EngineRequest(chat_ids(tokenizer, "Is water wet?"), params, sink, constraint=compiled)
    )
    sink.wait_done([key], timeout_s=600)
    assert sink.final[key].error is None and sink.text[key] in ("yes", "no")
    first = sink.token_outs[0]
    # Only tokens the constraint allows are listed, and they carry all the mass.
    for tok_id, _, _ in first.top:
        assert _decode(default_model, tok_id) in ("yes", "no", "y", "n", "ye")
    assert math.isclose(sum(math.exp(lp) for _, _, lp in first.top), 1.0, rel_tol=1e-4)


# ----- through router + worker processes --------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from tests.procs import start_router, start_worker

    worker = start_worker(
        "--dtype", "float32", "--worker-id", "constraints-w", "--max-running", "16"
    )
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address])
        router.wait_healthy(timeout_s=60)
        yield router, worker
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def generate_all(address: str, requests: list[generate_pb2.GenerateRequest]):
    with grpc.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerateStub(ch)
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: stub.Generate(r, timeout=900), requests))


def schema_requests(n: int, max_new: int = 96) -> list[generate_pb2.GenerateRequest]:
    out = []
    for i in range(n):
        prompt = ORDER_PROMPTS[i % len(ORDER_PROMPTS)]
        if i % 2:
            req = request_pb(
                schema_constraint(), prompt, max_new_tokens=max_new, temperature=0.9, seed=i
            )
        else:
            req = request_pb(schema_constraint(), prompt, max_new_tokens=max_new)
        out.append(req)
    return out


def check_through_router(router, n_schema: int) -> None:
    free = [request_pb(None, p, max_new_tokens=24) for p in FREE_PROMPTS]
    date = request_pb(generate_pb2.Constraint(regex=ISO_DATE), "Date?", max_new_tokens=16)
    choice = request_pb(
        generate_pb2.Constraint(choice=generate_pb2.Choices(options=list(CHOICES))),
        "Sentiment of 'great'?",
        max_new_tokens=8,
        temperature=0.8,
        seed=1,
    )
    batch = [*schema_requests(n_schema), date, choice, *free]
    replies = generate_all(router.address, batch)
    for reply in replies[:n_schema]:
        assert reply.finish_reason in (generate_pb2.EOS, generate_pb2.STOP), reply.text
        check_order(reply.text)
    assert re.fullmatch(ISO_DATE, replies[n_schema].text)
    assert replies[n_schema + 1].text in CHOICES
    alone = [generate_all(router.address, [r])[0] for r in free]
    assert [r.text for r in replies[n_schema + 2 :]] == [r.text for r in alone]


def test_through_router_outputs_validate_and_free_requests_are_unchanged(cluster):
    router, _ = cluster
    check_through_router(router, n_schema=4)


@pytest.mark.slow
def test_through_router_20_schema_prompts_greedy_and_sampled(cluster):
    router, _ = cluster
    check_through_router(router, n_schema=20)


@pytest.mark.parametrize(
    ("constraint", "problem"),
    [
        (generate_pb2.Constraint(json_schema='{"type": "objekt"}'), 'Unsupported type "objekt"'),
        (generate_pb2.Constraint(), "params.constraint is set but empty"),
        (generate_pb2.Constraint(regex="(["), "params.constraint.regex does not compile"),
    ],
)
def test_bad_constraints_through_router_are_invalid_argument(cluster, constraint, problem):
    router, worker = cluster
    for address in (router.address, worker.address):
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                generate_pb2_grpc.GenerateStub(ch).Generate(
                    request_pb(constraint, max_new_tokens=4), timeout=120
                )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in info.value.details()


def _info(address: str) -> worker_pb2.WorkerInfo:
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=30)


def _models(address: str) -> dict[tuple[str, str], bool]:
    with grpc.insecure_channel(address) as ch:
        reply = generate_pb2_grpc.GenerateStub(ch).ListModels(
            generate_pb2.ListModelsRequest(), timeout=30
        )
    return {(m.name, m.version): m.supports_constraints for m in reply.models}


def test_capability_flag_in_info_and_list_models_router_aggregates(cluster):
    """A real worker says it supports constraints; a null-engine worker (no logits) says
    it does not; the router's ListModels says yes only where every worker does, and a
    router over null workers alone refuses a constrained request before routing it."""
    from tests.procs import start_router, start_worker

    router, worker = cluster
    assert _info(worker.address).supports_constraints is True
    direct = _models(worker.address)
    assert direct and all(direct.values()), direct
    assert _models(router.address) == direct

    null = start_worker("--engine", "null", "--worker-id", "null-w", "--self-test-interval-s", "0")
    routers = []
    try:
        null.wait_healthy(timeout_s=120)
        assert _info(null.address).supports_constraints is False
        null_models = _models(null.address)
        assert null_models and not any(null_models.values()), null_models
        only_null = start_router([null.address])
        routers.append(only_null)
        mixed = start_router([worker.address, null.address])
        routers.append(mixed)
        only_null.wait_healthy(timeout_s=60)
        mixed.wait_healthy(timeout_s=60)
        assert not any(_models(only_null.address).values())
        # The base model is listed by both: a constrained request may land on either.
        base = next(k for k in direct if k[1] == "")
        assert _models(mixed.address)[base] is False
        with grpc.insecure_channel(only_null.address) as ch:
            with pytest.raises(grpc.RpcError) as raised:
                generate_pb2_grpc.GenerateStub(ch).Generate(
                    request_pb(schema_constraint(), max_new_tokens=4), timeout=60
                )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no worker of this cluster supports constraints" in raised.value.details()
    finally:
        for r in routers:
            r.stop()
        null.stop()

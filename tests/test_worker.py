"""A real ``llmcluster worker`` process, called as a client would."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc


@pytest.fixture(scope="module")
def channel(worker_proc):
    with grpc.insecure_channel(worker_proc.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return generate_pb2_grpc.GenerateStub(channel)


def running(channel) -> int:
    info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
    return info.load.running


def chat(text: str, **params) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role="user", content=text)],
        params=generate_pb2.SamplingParams(**params),
    )


def test_stream_yields_deltas_then_finish_and_usage(stub):
    msgs = list(stub.GenerateStream(chat("Name three colors.", max_new_tokens=12), timeout=120))
    assert len(msgs) >= 3
    *body, last = msgs
    assert all(m.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for m in body)
    assert all(not m.HasField("usage") for m in body)
    assert last.finish_reason in (generate_pb2.LENGTH, generate_pb2.EOS)
    u = last.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 12
    assert u.worker_id == "test-worker"
    assert 0 <= u.queue_ms <= u.time_to_first_token_ms <= u.total_ms
    assert sum(len(m.tokens) for m in msgs) == u.completion_tokens
    assert "".join(m.text for m in msgs).strip()


def test_unary_generate_matches_stream_and_echoes_request_id(stub):
    req = chat("Count to five.", max_new_tokens=10, logprobs=2)
    req.request_id = "req-123"
    streamed = list(stub.GenerateStream(req, timeout=120))
    unary = stub.Generate(req, timeout=120)
    assert unary.request_id == "req-123" and streamed[0].request_id == "req-123"
    assert unary.text == "".join(m.text for m in streamed)
    assert [t.id for t in unary.tokens] == [t.id for m in streamed for t in m.tokens]
    assert all(len(t.top_logprobs) == 2 for t in unary.tokens)


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "t0.7"])
def test_logprobs_over_the_wire_are_log_softmax_of_the_model(stub, default_model, temperature):
    """Issue 22 item 4: Token.logprob and TopLogprob.logprob are log-probabilities
    (log_softmax of the logits, divided by the temperature when sampling), not raw
    logits: checked against a separate forward pass of the same model and dtype."""
    import math

    import torch

    model, tokenizer = default_model
    prompt = "The capital of France is"
    req = generate_pb2.GenerateRequest(
        prompt=prompt,
        params=generate_pb2.SamplingParams(
            max_new_tokens=6, temperature=temperature, seed=5, logprobs=20, ignore_eos=True
        ),
    )
    tokens = list(stub.Generate(req, timeout=120).tokens)
    assert len(tokens) == 6
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prompt_ids + [t.id for t in tokens]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    expected = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    for token, row in zip(tokens, expected, strict=True):
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-3)
        assert token.logprob <= 0.0
        top = list(token.top_logprobs)
        assert len(top) == 20
        assert sum(math.exp(t.logprob) for t in top) <= 1.0 + 1e-4
        assert [t.id for t in top[:5]] == torch.topk(row, 5).indices.tolist()
        for t in top:
            assert t.logprob == pytest.approx(float(row[t.id]), abs=1e-3)
        if temperature == 0.0:  # greedy: the chosen token is the most likely one
            assert top[0].id == token.id


def test_stop_string_is_in_no_token_text_of_the_stream(stub):
    """Issue 22: the tokens' texts add up to the stream's text, stop string excluded."""
    req = chat("Explain gravity to a child in one long paragraph.", max_new_tokens=24)
    full = stub.Generate(req, timeout=120).text
    stop = full[10:17]  # most likely starts and ends inside tokens
    req.params.stop.append(stop)
    msgs = list(stub.GenerateStream(req, timeout=120))
    text = "".join(m.text for m in msgs)
    token_texts = [t.text for m in msgs for t in m.tokens]
    assert msgs[-1].finish_reason == generate_pb2.STOP
    assert text == full[: full.index(stop)]
    assert "".join(token_texts) == text
    assert all(m.text == "".join(t.text for t in m.tokens) for m in msgs)
    assert not any(stop in t for t in token_texts)
    assert len(token_texts) == msgs[-1].usage.completion_tokens


def test_list_models_and_health(stub, channel):
    models = stub.ListModels(generate_pb2.ListModelsRequest(), timeout=10).models
    assert [m.name for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].is_default and models[0].kind == generate_pb2.BASE
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


BAD_REQUESTS = [
    (generate_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (
        generate_pb2.GenerateRequest(
            prompt="x", messages=[generate_pb2.ChatMessage(role="user", content="y")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not both",
    ),
    (
        generate_pb2.GenerateRequest(
            prompt="x", params=generate_pb2.SamplingParams(max_new_tokens=0)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    (
        generate_pb2.GenerateRequest(
            prompt="x", params=generate_pb2.SamplingParams(max_new_tokens=100000)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    (
        generate_pb2.GenerateRequest(
            prompt="x", params=generate_pb2.SamplingParams(temperature=-1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    (
        generate_pb2.GenerateRequest(prompt="x", params=generate_pb2.SamplingParams(top_p=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    (
        generate_pb2.GenerateRequest(prompt="x", params=generate_pb2.SamplingParams(top_p=1.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    (
        generate_pb2.GenerateRequest(prompt="x", params=generate_pb2.SamplingParams(logprobs=99)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "logprobs",
    ),
    (
        generate_pb2.GenerateRequest(prompt="x " * 9000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "context",
    ),
    (
        generate_pb2.GenerateRequest(
            messages=[generate_pb2.ChatMessage(role="robot", content="hi")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    ),
    (generate_pb2.GenerateRequest(prompt="x", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "gpt-9"),
    (
        generate_pb2.GenerateRequest(prompt="x", adapter="no-such-adapter"),
        grpc.StatusCode.NOT_FOUND,
        "no-such-adapter",
    ),
    (
        generate_pb2.GenerateRequest(prompt="x", adapter="../etc"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "adapter: artifact name '../etc'",
    ),
]


@pytest.mark.parametrize("request_pb,code,fragment", BAD_REQUESTS)
def test_bad_input_gets_status_and_message(stub, request_pb, code, fragment):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_pb, timeout=30)
        assert err.value.code() == code
        assert fragment in err.value.details()


def test_worker_still_serves_after_bad_input(stub):
    reply = stub.Generate(chat("Say yes.", max_new_tokens=3), timeout=60)
    assert reply.usage.completion_tokens >= 1


def test_cancel_one_of_eight_streams(stub, channel, worker_proc):
    prompts = [f"Write a long story about planet number {i}." for i in range(8)]
    results: dict[int, list] = {}
    errors: dict[int, grpc.RpcError] = {}
    started = threading.Event()
    calls = [stub.GenerateStream(chat(p, max_new_tokens=40), timeout=300) for p in prompts]

    def consume(i):
        try:
            results[i] = []
            for msg in calls[i]:
                results[i].append(msg)
                if i == 3 and len(results[i]) >= 3:
                    started.set()
        except grpc.RpcError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    assert started.wait(120)
    before = running(channel)
    calls[3].cancel()
    deadline = time.monotonic() + 10
    while running(channel) >= before and time.monotonic() < deadline:
        time.sleep(0.02)
    if running(channel) >= before:
        load = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10).load
        pytest.fail(
            f"cancelled stream still holds its slot: running {before} -> {load.running}, "
            f"queued {load.queued}, steps {load.steps_total}, stream 3 had "
            f"{len(results[3])} messages\nworker log tail:\n{worker_proc.output()[-3000:]}"
        )
    for t in threads:
        t.join(300)
    assert errors[3].code() == grpc.StatusCode.CANCELLED
    for i in range(8):
        if i != 3:
            assert i not in errors
            assert results[i][-1].HasField("usage")


def test_deadline_frees_the_sequence(stub, channel):
    call = stub.GenerateStream(
        chat("Tell me everything about the ocean.", max_new_tokens=400), timeout=1.5
    )
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while running(channel) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(channel) == 0


def test_cli_generate_streams_to_stdout(worker_proc):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcluster",
            "generate",
            "--chat",
            "Say hello.",
            "--max-new-tokens",
            "8",
            "--target",
            worker_proc.address,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 2 and '"finishReason"' in lines[-1]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcluster",
            "generate",
            "x",
            "--top-p",
            "2",
            "--target",
            worker_proc.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Refused by the client itself (exit 2), in the server's words (tests/test_cli.py).
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr


def test_cli_generate_reads_the_prompt_from_stdin_and_a_file(worker_proc, tmp_path):
    def generate(*args: str, stdin: str = "") -> str:
        out = subprocess.run(
            [sys.executable, "-m", "llmcluster", "generate", *args, "--max-new-tokens", "4"]
            + ["--target", worker_proc.address, "--json"],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    long_prompt = "The river flows. " * 300  # in-process, test_cli reads 50k words
    path = tmp_path / "prompt.txt"
    path.write_text(long_prompt, encoding="utf-8")
    from_stdin = generate("-", stdin=long_prompt)
    from_file = generate("--prompt-file", str(path))
    usages = [json.loads(line)["usage"] for line in (from_stdin, from_file)]
    assert usages[0]["promptTokens"] == usages[1]["promptTokens"] > 1000


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dtype", "float64"], "dtype must be one of"),
        (["--max-running", "0"], "max_running must be >= 1, got 0"),
        (["--engine", "fast"], "engine must be 'model' or 'null'"),
        (["--job-lease-s", "0.5"], "job_lease_s must be in [1, 3600], got 0.5"),
        (["--job-lease-s", "3601"], "job_lease_s must be in [1, 3600], got 3601"),
        (["--nproc", "0"], "nproc must be >= 1, got 0"),
        (["--nproc", "65"], "nproc must be <= 64, got 65"),
    ],
)
def test_bad_flags_exit_2_with_a_message(flags, fragment):
    out = subprocess.run(
        [sys.executable, "-m", "llmcluster", "worker", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr

"""The router's OpenAI-compatible HTTP gateway, driven by the official ``openai`` client.

One real worker (default model, float32) behind a real router started with
``--http-port``; every test talks HTTP to the router as an outside client would, and
reads the worker's own ``Info`` where it has to see a slot freed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx  # the openai client's own HTTP library
import hypothesis
import jsonschema
import openai
import pydantic
import pytest
import schemathesis
from prometheus_client.parser import text_string_to_metric_families

from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.otlp_receiver import OtlpReceiver
from tests.procs import Proc, free_port, start_router, start_worker
from tests.test_finetune import temp_home

MODEL = "SmolLM2-135M-Instruct"
FINETUNE = "llmcluster.v1.FineTune"
DATA = Path(__file__).resolve().parent / "data" / "finetune"
RECORD = re.compile(r"^ ?<<NAME: [A-Za-z]+ \| AGE: \d+ \| CITY: [A-Za-z ]+>>$")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return temp_home(tmp_path_factory.mktemp("gateway-home"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def _env(home: Path, receiver: OtlpReceiver) -> dict[str, str]:
    env = receiver.env(
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_TRACES_SAMPLER="parentbased_always_on",
        LLMCLUSTER_HOME=str(home),
    )
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "TRACEPARENT"):
        env[name] = ""
    return env


@pytest.fixture(scope="module")
def worker(home: Path, receiver: OtlpReceiver) -> Iterator[Proc]:
    proc = start_worker(
        "--dtype", "float32", "--worker-id", "gw-worker", "--max-running", "8",
        "--self-test-interval-s", "0", env=_env(home, receiver),
    )  # fmt: skip
    try:
        proc.wait_healthy(timeout_s=300)
        yield proc
    finally:
        proc.stop()


METRICS_PORT: dict[str, int] = {}


@pytest.fixture(scope="module")
def gateway(worker: Proc, home: Path, receiver: OtlpReceiver) -> Iterator[tuple[Proc, str]]:
    """The router with its HTTP gateway, and the gateway's base URL."""
    http_port, metrics_port = free_port(), free_port()
    METRICS_PORT["router"] = metrics_port
    proc = start_router(
        [worker.address], "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        env=_env(home, receiver),
    )  # fmt: skip
    try:
        proc.wait_healthy(timeout_s=60, service=FINETUNE)
        yield proc, f"http://127.0.0.1:{http_port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(gateway: tuple[Proc, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway[1] + "/v1", api_key="unused", max_retries=0, timeout=300
    ) as c:
        yield c


@pytest.fixture
def http(gateway: tuple[Proc, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway[1], timeout=120) as c:
        yield c


def _running(worker: Proc) -> int:
    with grpc.insecure_channel(worker.address) as ch:
        load = worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=10).load
    return load.running + load.queued


# ---- generation ------------------------------------------------------------------------


def test_chat_stream_with_usage_matches_the_whole_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2, "content deltas arrive as separate chunks"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] is chunks[-2]
    assert finish[0].choices[0].finish_reason in ("stop", "length")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert whole.choices[0].message.content == streamed
    assert whole.usage is not None and whole.usage.model_dump() == last.usage.model_dump()
    assert whole.usage.completion_tokens <= 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_with_logprobs_stop_and_stream(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = reply.choices[0]
    assert choice.text and reply.usage is not None
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens or []) == reply.usage.completion_tokens
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs or [])
    assert "".join(choice.logprobs.tokens or []) == choice.text

    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    first_word = choice.text.split()[0]
    stopped = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
        stop=[first_word],
    )  # fmt: skip
    assert first_word not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    def once() -> str | None:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}],
            max_completion_tokens=8, temperature=1.0, top_p=0.9, seed=1234, user="tester",
        )  # fmt: skip
        return reply.choices[0].message.content

    assert once() == once()


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list().data
    base = [m for m in models if m.id == MODEL]
    assert base and base[0].owned_by == "llmcluster" and base[0].created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_or_empty_model_is_not_found(client: openai.OpenAI) -> None:
    for model in ("no-such-model", "no-such@3", ""):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.code == "model_not_found", model
        assert info.value.body["param"] == "model"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 2}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        ({"stop": ["x"] * 9}, "stop"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_field(
    client: openai.OpenAI, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **extra
        )
    assert info.value.body["param"] == param, info.value.body  # type: ignore[index]
    assert param in info.value.message


class City(pydantic.BaseModel):
    # Bounded, so a small sampled model cannot spend its token budget inside one string.
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population_millions: int = pydantic.Field(ge=0, le=1000)


def test_parse_with_a_pydantic_model_answers_in_its_schema(client: openai.OpenAI) -> None:
    """response_format becomes the engine's constraint: the client's own ``parse`` turns
    the answer into the pydantic model it asked for, sampled or greedy."""
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Paris: its name, country and population."}],
            response_format=City, max_tokens=128, temperature=temperature, seed=7,
        )  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, City), choice.message.content
        assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_and_streamed_schema_answers_are_json(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user",
                   "content": 'Reply with a JSON object with one key "answer": what is 2+2?'}],
        response_format={"type": "json_object"}, max_tokens=64, temperature=0,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)

    schema = {"type": "object", "properties": {"colours": {"type": "array", "items":
              {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 2,
              "maxItems": 3}}, "required": ["colours"], "additionalProperties": False}  # fmt: skip
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name colours."}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "colours",
                         "schema": schema, "strict": True}},
        max_tokens=64, temperature=0,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    jsonschema.validate(json.loads(text), schema)
    completion = client.completions.create(
        model=MODEL, prompt="A JSON object:", max_tokens=64, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(completion.choices[0].text), dict)


def test_a_schema_that_does_not_compile_is_a_400_with_the_compilers_message(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema":
                             {"type": "integer", "minimum": 5, "maximum": 1}}},
        )  # fmt: skip
    assert info.value.body["param"] == "response_format"  # type: ignore[index]
    message = info.value.message
    assert "response_format.json_schema.schema does not compile" in message, message
    assert "minimum greater than maximum" in message.lower(), message


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"model": "x", "messages": [', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"model": "%s", "messages": "hi"}' % MODEL.encode(), "messages"),
        (
            b'{"model": "%s", "messages": [{"role": "user"}], "max_tokens": "ten"}'
            % MODEL.encode(),
            "max_tokens",
        ),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        # Strict types, as OpenAI: a number in a string is no number.
        (
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}'
            % MODEL.encode(),
            "max_tokens",
        ),
        (
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}'
            % MODEL.encode(),
            "temperature",
        ),
        (
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}'
            % MODEL.encode(),
            "stream",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model is required"),
        (b'{"model": "%s", "messages": []}' % MODEL.encode(), "messages"),
        (
            b'{"model": "%s", "messages": [{"role": "robot", "content": "hi"}]}' % MODEL.encode(),
            "role",
        ),
        (b"[1, 2]", "Input should be"),
    ],
)
def test_malformed_and_mistyped_bodies_are_400(
    http: httpx.Client, body: bytes, needle: str
) -> None:
    reply = http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"], error


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "developer", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
              "max_tokens": 2, "frobnicate": {"a": 1}, "presence_penalty": 0.5},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 2


def test_huge_body_is_413_before_it_is_read(http: httpx.Client) -> None:
    huge = b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    reply = http.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert "larger than" in reply.json()["error"]["message"]


def test_chunked_bodies_past_the_limit_are_413_and_nothing_is_written(
    http: httpx.Client, home: Path
) -> None:
    """Without a Content-Length the limit is counted as the body arrives: a JSON body
    and a multipart upload, sent in chunks, are refused alike (not a 400 or a 500)."""

    def json_chunks() -> Iterator[bytes]:
        yield b'{"model": "x", "prompt": "'
        for _ in range(6):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    reply = http.post(
        "/v1/completions", content=json_chunks(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413, reply.text
    assert "larger than" in reply.json()["error"]["message"]

    before = _stored(home)
    boundary = "llmcluster-test-boundary"

    def upload_chunks() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        line = b'{"text": "' + b"a" * (1024 * 1024) + b'"}\n'
        for _ in range(34):  # past the default 32 MiB file limit
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = http.post(
        "/v1/files",
        content=upload_chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert reply.status_code == 413, reply.text
    assert _stored(home) == before


def test_unknown_route_is_an_openai_shaped_404(http: httpx.Client) -> None:
    reply = http.get("/v1/no/such/thing")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


def test_closing_the_stream_frees_the_workers_slot(gateway: tuple[Proc, str], worker: Proc) -> None:
    deadline = time.monotonic() + 60
    while _running(worker) and time.monotonic() < deadline:  # earlier tests are done
        time.sleep(0.05)
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Write a long essay on rivers."}],
        "max_tokens": 1000, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with (
        httpx.Client(base_url=gateway[1], timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        seen = 0
        while seen < 3:
            line = next(lines)
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"]
                seen += 1
        assert _running(worker) == 1
        closed = time.monotonic()
    # 1000 tokens take far longer than this; only the cancel can free the slot now.
    while _running(worker):
        assert time.monotonic() - closed < 1.0, "slot still held a second after close"
        time.sleep(0.02)


def test_leaving_a_whole_answer_early_frees_the_slot_too(
    gateway: tuple[Proc, str], worker: Proc
) -> None:
    import socket

    deadline = time.monotonic() + 60
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    body = json.dumps(
        {"model": MODEL, "prompt": "Rivers", "max_tokens": 1000, "ignore_eos": True}
    ).encode()
    port = int(gateway[1].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        while not _running(worker):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    closed = time.monotonic()
    while _running(worker):  # the gateway polls for the disconnect every 0.25 s
        assert time.monotonic() - closed < 1.5, "slot still held after the client left"
        time.sleep(0.02)


def test_a_full_router_queue_is_429_with_retry_after(worker: Proc, home: Path) -> None:
    http_port = free_port()
    proc = start_router(
        [worker.address], "--max-queue", "1", "--http-port", str(http_port),
        env={"LLMCLUSTER_HOME": str(home)},
    )  # fmt: skip
    body = {
        "model": MODEL, "prompt": "Rivers", "max_tokens": 500, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    try:
        proc.wait_healthy(timeout_s=60)
        base = f"http://127.0.0.1:{http_port}"
        with (
            httpx.Client(base_url=base, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as first,
        ):
            assert first.status_code == 200
            lines = first.iter_lines()  # held: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # admitted and streaming: queue full now
            with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as c:
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
            assert info.value.response.headers["retry-after"] == "1"
            assert "queue is full" in info.value.message
    finally:
        proc.stop()


def test_one_trace_from_the_http_traceparent_to_the_worker(
    http: httpx.Client, receiver: OtlpReceiver
) -> None:
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
              "stream": True},
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
    )  # fmt: skip
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    spans = receiver.wait_for(
        lambda ss: (
            {"llmcluster-router", "llmcluster-worker"}
            <= {s.service_name for s in ss if s.trace_id == trace_id}
            and any(s.name == "POST /v1/chat/completions" for s in ss if s.trace_id == trace_id)
        ),
        timeout_s=30,
    )
    mine = {s.span_id: s for s in spans if s.trace_id == trace_id}
    http_spans = [s for s in mine.values() if s.name == "POST /v1/chat/completions"]
    assert len(http_spans) == 1, http_spans  # ours alone: no framework's second SERVER span
    http_span = http_spans[0]
    assert http_span.parent_span_id == caller_span
    assert http_span.attributes["http.route"] == "/v1/chat/completions"
    assert http_span.attributes["http.response.status_code"] == 200
    assert http_span.attributes["gen_ai.usage.output_tokens"] >= 1
    router_span = next(s for s in mine.values() if s.name == "router request")
    assert router_span.parent_span_id == http_span.span_id
    worker_spans = [s for s in mine.values() if s.service_name == "llmcluster-worker"]
    assert worker_spans, "the worker's spans join the HTTP caller's trace"


def _router_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The router's real /metrics, every sample as {(name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT['router']}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    )


def test_requests_are_counted_once_and_latencies_by_api(
    client: openai.OpenAI, gateway: tuple[Proc, str]
) -> None:
    """An HTTP call counts once (as openai.<endpoint>, not also as the Generate it runs
    in process); TTFT, inter-token and end-to-end histograms say which API served it."""
    before = _router_metrics()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], stream=True,
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) >= 2
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=1)
    with grpc.insecure_channel(gateway[0].address) as channel:
        request = generate_pb2.GenerateRequest(
            model=MODEL, prompt="Hi", params=generate_pb2.SamplingParams(max_new_tokens=4,
                                                                        ignore_eos=True))  # fmt: skip
        replies = list(generate_pb2_grpc.GenerateStub(channel).GenerateStream(request, timeout=60))
        assert replies[-1].usage.completion_tokens == 4
    after = _router_metrics()

    def moved(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    router = {"role": "router"}
    assert moved("llmcluster_requests_total", method="openai.chat.completions", code="OK") == 1
    assert moved("llmcluster_requests_total", method="openai.completions", code="OK") == 1
    assert moved("llmcluster_requests_total", method="openai.completions", code="NOT_FOUND") == 1
    assert moved("llmcluster_requests_total", method="GenerateStream", **router) == 1  # gRPC's
    assert moved("llmcluster_requests_total", method="Generate", **router) == 0
    assert moved("llmcluster_requests_total", **router) == 4
    for api, requests in (("openai", 2), ("grpc", 1)):
        assert moved("llmcluster_time_to_first_token_seconds_count", api=api) == requests, api
        assert moved("llmcluster_e2e_request_latency_seconds_count", api=api) == requests, api
        assert moved("llmcluster_request_prompt_tokens_count", api=api) == requests, api
    # 6 + 1 tokens over HTTP, 4 over gRPC: the tokens after a request's first delta are gaps.
    assert 1 <= moved("llmcluster_inter_token_latency_seconds_count", api="openai") <= 5
    assert 1 <= moved("llmcluster_inter_token_latency_seconds_count", api="grpc") <= 3
    assert moved("llmcluster_request_generation_tokens_sum", api="openai") == 7


# ---- files and fine-tuning ---------------------------------------------------------------


def _files_dir(home: Path) -> Path:
    return home / "files"


def _stored(home: Path) -> set[str]:
    folder = _files_dir(home)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _records(n: int) -> str:
    return "\n".join((DATA / "records.jsonl").read_text().splitlines()[:n]) + "\n"


def test_bad_uploads_are_refused_and_nothing_is_written(
    client: openai.OpenAI, http: httpx.Client, home: Path
) -> None:
    before = _stored(home)
    lines = _records(10).splitlines()
    lines[6] = '{"prompt": "unterminated'
    with pytest.raises(openai.BadRequestError, match="line 7: invalid JSON"):
        client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    lines[6] = '["a list"]'
    with pytest.raises(openai.BadRequestError, match="line 7: expected a JSON object"):
        client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("ok.jsonl", _records(3).encode()), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="UTF-8"):
        client.files.create(file=("bin.jsonl", b"\xff\xfe\x00"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="no JSONL rows"):
        client.files.create(file=("empty.jsonl", b"\n\n"), purpose="fine-tune")
    reply = http.post("/v1/files", content=b"not multipart", headers={"content-type": "text/plain"})
    assert reply.status_code == 400
    huge = b'{"text": "' + b"a" * (33 * 1024 * 1024) + b'"}\n'
    reply = http.post(
        "/v1/files", files={"file": ("big.jsonl", huge)}, data={"purpose": "fine-tune"}
    )
    assert reply.status_code == 413
    assert _stored(home) == before


def test_files_and_jobs_endpoints(client: openai.OpenAI, home: Path) -> None:
    uploaded = client.files.create(
        file=("records.jsonl", _records(24).encode()), purpose="fine-tune"
    )
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(_records(24).encode())
    assert client.files.retrieve(uploaded.id).filename == "records.jsonl"
    assert uploaded.id in {f.id for f in client.files.list()}
    assert (_files_dir(home) / f"{uploaded.id}.jsonl").read_text() == _records(24)

    with pytest.raises(openai.BadRequestError, match="training_file|no such file"):
        client.fine_tuning.jobs.create(training_file="file-" + "0" * 24, model=MODEL)
    with pytest.raises(openai.BadRequestError, match="method.type"):
        client.fine_tuning.jobs.create(
            training_file=uploaded.id, model=MODEL, method={"type": "dpo"}
        )
    with pytest.raises(openai.BadRequestError, match="suffix|output_name"):
        client.fine_tuning.jobs.create(training_file=uploaded.id, model=MODEL, suffix="../evil")

    job = client.fine_tuning.jobs.create(
        training_file=uploaded.id, model=MODEL, suffix="gw-cancelled",
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"},
    )  # fmt: skip
    assert job.object == "fine_tuning.job" and job.training_file == uploaded.id
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 1
    assert client.fine_tuning.jobs.cancel(job.id).status in ("queued", "running", "cancelled")
    # A queued job ends at once, a running one within a training step.
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status != "cancelled":
        assert job.status in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.5)
    listed = client.fine_tuning.jobs.list(limit=100)
    assert job.id in {j.id for j in listed.data}
    events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
    assert events and events[0].message.startswith("Job cancelled"), [e.message for e in events]
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ft-no-such-job")

    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert not (_files_dir(home) / f"{uploaded.id}.jsonl").exists()


def _as_chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"].strip()}]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fine_tuned_model_answers_chat_at_once_with_the_trained_format(
    client: openai.OpenAI,
) -> None:
    rows = [json.loads(x) for x in (DATA / "records.jsonl").read_text().splitlines()]
    dataset = "\n".join(json.dumps(_as_chat(r)) for r in rows).encode()
    uploaded = client.files.create(file=("records-chat.jsonl", dataset), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=uploaded.id, model=MODEL, suffix="gw-records", seed=0,
        # Beyond OpenAI's three: our own Hyperparameters names (the issue 5 bar's recipe).
        hyperparameters={"n_epochs": 1, "batch_size": 8, "max_steps": 8, "learning_rate": 1e-3,
                         "warmup_ratio": 0.1, "max_seq_length": 96, "eval_fraction": 0.05},
    )  # fmt: skip
    deadline = time.monotonic() + 1500
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1.0)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("gw-records@")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Job succeeded") for m in messages), messages
    assert any(job.fine_tuned_model in m for m in messages), messages

    heldout = [json.loads(x) for x in (DATA / "records_heldout.jsonl").read_text().splitlines()[:5]]
    for row in heldout:
        chat = [{"role": "user", "content": row["prompt"]}]
        tuned = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=chat,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        base = client.chat.completions.create(
            model=MODEL,
            messages=chat,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        assert RECORD.match(tuned.choices[0].message.content or ""), tuned.choices[0].message
        assert "<<NAME:" not in (base.choices[0].message.content or "")
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}


# ---- schemathesis against the gateway's own OpenAPI document ------------------------------

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
SCHEMA_CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]
api_schema = schemathesis.pytest.from_fixture("openapi_schema")


@pytest.fixture(scope="module")
def openapi_schema(gateway: tuple[Proc, str]) -> Any:
    return schemathesis.openapi.from_url(gateway[1] + "/openapi.json")


def _realistic(case: Any) -> None:
    """Generated bodies name our model half the time (else every one is a 404 and the
    engine is never reached) and ask for at most 4 tokens (a test, not a benchmark)."""
    if case.operation.path not in GENERATE_PATHS or not isinstance(case.body, dict):
        return
    body = case.body
    if len(json.dumps(body, default=str)) % 2:
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is None or (isinstance(body[key], int) and body[key] > 4):
            body[key] = 4


def _conforms(case: Any) -> None:
    _realistic(case)
    case.call_and_validate(checks=SCHEMA_CHECKS, timeout=120)


# File uploads are left out of the default run: each generated multipart body is a file
# the gateway checks and may store, which adds little over test_bad_uploads and costs time.
@api_schema.exclude(path="/v1/files", method="POST").parametrize()
@hypothesis.settings(
    max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)  # fmt: skip
def test_every_operation_answers_as_its_openapi_document_says(case: Any) -> None:
    """No 500s; every status, content type, header and body is one the document declares."""
    _conforms(case)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one test for every operation: ~5 min for the two generating ones
@api_schema.parametrize()
@hypothesis.settings(
    max_examples=100, deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)  # fmt: skip
def test_every_operation_conforms_under_a_longer_fuzz(case: Any) -> None:
    _conforms(case)


# ---- process wiring -------------------------------------------------------------------


def test_taken_http_port_fails_the_router_clearly(worker: Proc) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = start_router([worker.address], "--http-port", str(port))
        try:
            assert proc.popen.wait(60) == 2  # PortInUse: the same exit code as every port
            assert f"HTTP gateway port {port} is in use" in proc.output()
        finally:
            proc.stop()


# ---- playground in a real browser ---------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_playground_streams_an_answer_in_headless_chromium(gateway: tuple[Proc, str]) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(gateway[1] + "/")
            page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
            page.fill("#prompt", "Say hello.")
            page.click("#send")
            page.wait_for_function(
                "document.querySelector('.turn.assistant') &&"
                " document.querySelector('.turn.assistant').textContent.length > 0",
                timeout=120_000,
            )
            page.wait_for_function(
                "document.getElementById('stats').textContent.includes('completion')",
                timeout=120_000,
            )
            answer = page.inner_text(".turn.assistant")
            stats = page.inner_text("#stats")
        finally:
            browser.close()
    assert answer.strip()
    assert re.search(r"TTFT \d+ ms", stats) and re.search(r"completion \d+ tokens", stats), stats


def test_router_never_imports_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, router.gateway, router.server; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert out.stdout.strip() == "False"

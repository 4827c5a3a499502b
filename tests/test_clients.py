"""The Node and Go example clients (examples/clients/), built from protos/ alone, against
a real router + worker: same greedy tokens as the Python client, a cancelled stream frees
its slot on the worker, and bad input gets the same status code and message.

Needs node + npm packages and Go (scripts/install_client_toolchains.sh installs both);
each language's tests skip, saying why, where its toolchain is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jsonschema
import pytest

from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.procs import Proc, free_port, start_router, start_worker

pytestmark = pytest.mark.clients

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENTS = REPO_ROOT / "examples" / "clients"
NODE_DIR = CLIENTS / "node"
GO_DIR = CLIENTS / "go"
GOCODE = Path(os.environ.get("GOCODE", "/usr/share/gocode"))
INSTALL_HINT = "run scripts/install_client_toolchains.sh"

PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 8
# Long enough that an uncancelled stream would still be decoding when the test checks.
CANCEL_MAX_NEW_TOKENS = 1024


def _run(cmd: list[str], cwd: Path, timeout_s: float = 240.0, **env: str) -> str:
    result = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **env},
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def _node_missing() -> str | None:
    if shutil.which("node") is None:
        return "node not installed"
    if not (NODE_DIR / "node_modules" / ".bin" / "buf").exists():
        return f"npm packages of examples/clients/node not installed: {INSTALL_HINT}"
    return None


def _go_missing() -> str | None:
    for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed: {INSTALL_HINT}"
    for package in ("google.golang.org/grpc", "google.golang.org/protobuf"):
        if not (GOCODE / "src" / package).is_dir():
            return f"Go package {package} not in {GOCODE}: {INSTALL_HINT}"
    return None


@dataclass
class Client:
    """A built example client: ``run(mode, ...)`` returns its JSON summary line."""

    name: str
    argv: list[str]
    cwd: Path

    def run(self, target: str, mode: str, *extra: str) -> dict:
        out = _run(
            [*self.argv, "--target", target, "--mode", mode, "--prompt", PROMPT, *extra],
            self.cwd,
            timeout_s=120,
        )
        lines = out.strip().splitlines()
        assert lines, f"{self.name} printed nothing"
        return json.loads(lines[-1])


@pytest.fixture(scope="module")
def node_client() -> Client:
    if reason := _node_missing():
        pytest.skip(reason)
    _run(["node", "generate.js"], NODE_DIR)  # fresh stubs from protos/
    return Client("node", ["node", "client.js"], NODE_DIR)


@pytest.fixture(scope="module")
def go_client() -> Client:
    if reason := _go_missing():
        pytest.skip(reason)
    _run(["bash", "generate.sh"], GO_DIR, PYTHON=sys.executable)  # stubs + build
    return Client("go", [str(GO_DIR / "bin" / "llmcluster-go-client")], GO_DIR)


@pytest.fixture(params=["node", "go"])
def client(request) -> Client:
    return request.getfixturevalue(f"{request.param}_client")


@dataclass
class Cluster:
    worker: Proc
    router: Proc
    http_url: str  # the router's OpenAI-compatible gateway


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if _node_missing() and _go_missing():
        pytest.skip(f"neither Node ({_node_missing()}) nor Go ({_go_missing()}) is usable")
    worker = start_worker("--dtype", "float32")
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        http_port = free_port()
        router = start_router([worker.address], "--http-port", str(http_port))
        router.wait_healthy(timeout_s=120)
        yield Cluster(worker, router, f"http://127.0.0.1:{http_port}")
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def _request(**params) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=PROMPT, params=generate_pb2.SamplingParams(temperature=0.0, **params)
    )


def _python_stream(address: str, request: generate_pb2.GenerateRequest) -> dict:
    """What the Python client streams for ``request``, in the example clients' summary keys."""
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        ids: list[int] = []
        text = ""
        finish = 0
        for msg in stub.GenerateStream(request, timeout=120):
            ids.extend(t.id for t in msg.tokens)
            text += msg.text
            finish = msg.finish_reason or finish
    return {
        "token_ids": ids,
        "text": text,
        "finish_reason": generate_pb2.FinishReason.Name(finish),
    }


@pytest.fixture(scope="module")
def python_reference(cluster: Cluster) -> dict:
    """What the Python client streams for the same greedy request through the router."""
    return _python_stream(cluster.router.address, _request(max_new_tokens=MAX_NEW_TOKENS))


def _load(worker: Proc) -> worker_pb2.Load:
    with grpc.insecure_channel(worker.address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
    return info.load


def test_stream_matches_python_client(client: Client, cluster: Cluster, python_reference):
    summary = client.run(cluster.router.address, "stream", "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert summary["code"] == "OK"
    assert summary["token_ids"] == python_reference["token_ids"]
    assert summary["text"] == python_reference["text"]
    assert summary["finish_reason"] == python_reference["finish_reason"]
    assert len(summary["token_ids"]) > 1
    assert summary["messages"] > 1, "tokens should arrive over several messages"


def test_cancelled_stream_frees_its_slot(client: Client, cluster: Cluster):
    before = _load(cluster.worker)
    summary = client.run(
        cluster.router.address,
        "cancel",
        "--max-new-tokens",
        str(CANCEL_MAX_NEW_TOKENS),
        "--ignore-eos",
        "--cancel-after",
        "2",
    )
    assert summary["code"] == "CANCELLED"
    assert summary["messages"] == 2
    # The router forwards the cancel; the worker frees the sequence at its next iteration.
    deadline = time.monotonic() + 15.0
    load = _load(cluster.worker)
    while (load.running or load.queued) and time.monotonic() < deadline:
        time.sleep(0.1)
        load = _load(cluster.worker)
    assert (load.running, load.queued) == (0, 0), f"slot not freed: {load}"
    generated = load.generated_tokens_total - before.generated_tokens_total
    assert generated < CANCEL_MAX_NEW_TOKENS, "the sequence ran to completion: not cancelled"


@pytest.mark.parametrize(
    ("flags", "params"),
    [
        (["--top-p", "2"], {"top_p": 2.0}),
        (["--top-p", "1", "--max-new-tokens", "0"], {"top_p": 1.0, "max_new_tokens": 0}),
    ],
    ids=["top_p=2", "max_new_tokens=0"],
)
def test_bad_request_same_status_as_python(client: Client, cluster: Cluster, flags, params):
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.GenerateStream(_request(**params), timeout=60))
    expected_code = raised.value.code()
    assert expected_code == grpc.StatusCode.INVALID_ARGUMENT
    summary = client.run(cluster.router.address, "bad", *flags)
    assert summary["code"] == expected_code.name
    assert summary["code_number"] == expected_code.value[0]
    assert summary["message"] == raised.value.details()


# ---- the official `openai` npm client against the router's HTTP gateway ------------------

CHAT_MODEL = "SmolLM2-135M-Instruct"
CHAT_PROMPT = "Name three rivers."


def _openai_node(cluster: Cluster, *flags: str) -> dict:
    if reason := _node_missing():
        pytest.skip(reason)
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        pytest.skip(f"the openai npm package is not installed: {INSTALL_HINT}")
    out = _run(
        ["node", "openai_chat.js", "--base-url", cluster.http_url + "/v1", *flags],
        NODE_DIR,
        timeout_s=120,
    )
    lines = out.strip().splitlines()
    assert lines, "openai_chat.js printed nothing"
    return json.loads(lines[-1])


def test_openai_npm_client_streams_a_chat_completion(cluster: Cluster) -> None:
    """The `openai` npm package streams from the gateway as from OpenAI: role first,
    content over several chunks, a finish reason, a last chunk with usage; the text is
    the Python client's for the same greedy request."""
    summary = _openai_node(
        cluster, "--model", CHAT_MODEL, "--prompt", CHAT_PROMPT, "--max-tokens", "12"
    )
    assert "error" not in summary, summary
    assert summary["role"] == "assistant"
    assert summary["contentChunks"] >= 2, "content deltas arrive as separate chunks"
    assert summary["finishReason"] in ("stop", "length")
    usage = summary["usage"]
    assert usage and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(summary["ids"]) == 1 and summary["ids"][0].startswith("chatcmpl-")

    import openai  # the pinned Python client (dev extras), for the reference answer

    with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0) as c:
        reference = c.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": CHAT_PROMPT}],
            max_tokens=12, temperature=0,
        )  # fmt: skip
    assert summary["text"] == reference.choices[0].message.content
    assert usage["completion_tokens"] == reference.usage.completion_tokens  # type: ignore[union-attr]


def test_openai_npm_client_sees_openai_errors(cluster: Cluster) -> None:
    missing = _openai_node(cluster, "--model", "no-such-model")
    assert missing["error"]["status"] == 404 and missing["error"]["code"] == "model_not_found"
    bad = _openai_node(cluster, "--model", CHAT_MODEL, "--temperature", "-1")
    assert bad["error"]["status"] == 400 and bad["error"]["param"] == "temperature"


# Structured output: an object with an enum, a bounded integer and a short string array.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Lyon", "Marseille"]},
        "population_millions": {"type": "integer", "minimum": 1, "maximum": 40},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 2},
    },
    "required": ["city", "population_millions", "landmarks"],
    "additionalProperties": False,
}
ISO_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ["Paris", "London", "Berlin"]
CONSTRAINED_MAX_NEW_TOKENS = 64


def _check_city(text: str) -> None:
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


def _check_date(text: str) -> None:
    assert re.fullmatch(ISO_DATE, text), text


def _check_choice(text: str) -> None:
    assert text in CHOICES, text


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "city.schema.json"
    path.write_text(json.dumps(CITY_SCHEMA))
    return path


# regex is the same path as the other two (a third flag): slow, to keep the default run cheap.
@pytest.mark.parametrize(
    "kind", ["json-schema", pytest.param("regex", marks=pytest.mark.slow), "choice"]
)
def test_constrained_stream_matches_python_client(
    client: Client, cluster: Cluster, schema_file: Path, kind: str
):
    """--json-schema FILE / --regex / --choice: the output obeys the constraint, ends
    with the constraint complete, and is token-identical to the Python client's."""
    constraint, flag_value, check = {
        "json-schema": (
            generate_pb2.Constraint(json_schema=schema_file.read_text()),
            str(schema_file),
            _check_city,
        ),
        "regex": (generate_pb2.Constraint(regex=ISO_DATE), ISO_DATE, _check_date),
        "choice": (
            generate_pb2.Constraint(choice=generate_pb2.Choices(options=CHOICES)),
            ",".join(CHOICES),
            _check_choice,
        ),
    }[kind]
    reference = _python_stream(
        cluster.router.address,
        _request(max_new_tokens=CONSTRAINED_MAX_NEW_TOKENS, constraint=constraint),
    )
    check(reference["text"])
    summary = client.run(
        cluster.router.address,
        "stream",
        "--max-new-tokens",
        str(CONSTRAINED_MAX_NEW_TOKENS),
        f"--{kind}",
        flag_value,
    )
    assert summary["code"] == "OK"
    check(summary["text"])
    assert summary["finish_reason"] in ("EOS", "STOP"), summary
    assert summary["token_ids"] == reference["token_ids"]
    assert summary["text"] == reference["text"]

"""The OpenAI request translation and error mapping of the HTTP gateway (no server)."""

from __future__ import annotations

import json

import grpc
import pytest

from common.pb import generate_pb2
from router.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    api_error_from_status,
    chat_to_pb,
    completion_to_pb,
    finish_reason,
)


def test_chat_fields_become_one_generate_request() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m", "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5,
            "top_p": 0.9, "stop": "END", "seed": -1, "logprobs": True, "top_logprobs": 3,
            "messages": [{"role": "developer", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}],
            "tools": [{"ignored": True}],
        }
    )  # fmt: skip
    pb = chat_to_pb(body, "base", "ad@2")
    assert (pb.model, pb.adapter) == ("base", "ad@2")
    assert [(m.role, m.content) for m in pb.messages] == [("system", "sys"), ("user", "ab")]
    p = pb.params
    assert p.max_new_tokens == 7  # max_completion_tokens wins over the older max_tokens
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert list(p.stop) == ["END"] and p.seed == (1 << 64) - 1 and p.logprobs == 3


def test_defaults_follow_openai() -> None:
    pb = chat_to_pb(
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        ),
        "",
        "",
    )
    assert pb.params.temperature == 1.0 and not pb.params.HasField("max_new_tokens")
    assert pb.params.logprobs == 0
    # logprobs=true with no alternatives still needs the chosen token's logprob.
    with_lp = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    )
    assert chat_to_pb(with_lp, "", "").params.logprobs == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 3}, "n"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"echo": True}, "echo"),
    ],
)
def test_unsupported_options_are_400_naming_the_field(body: dict, param: str) -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})
    with pytest.raises(ApiError) as info:
        completion_to_pb(request, "", "")
    assert info.value.status == 400 and info.value.param == param


def test_image_parts_are_refused() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    )
    with pytest.raises(ApiError, match="only text parts"):
        chat_to_pb(body, "", "")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_status_mapping(code: grpc.StatusCode, status: int, kind: str) -> None:
    error = api_error_from_status(code, "why")
    assert (error.status, error.type) == (status, kind)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert ("Retry-After" in error.headers) == (status == 429)


def test_our_field_names_become_openai_names() -> None:
    error = api_error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "params.max_new_tokens must be in [1, 2048], got 0"
    )
    assert error.param == "max_tokens" and error.message.startswith("max_tokens must be")
    missing = api_error_from_status(
        grpc.StatusCode.NOT_FOUND, "adapter 'x' not found", not_found_code="model_not_found"
    )
    assert (missing.code, missing.param) == ("model_not_found", "model")


def test_finish_reasons() -> None:
    assert finish_reason(generate_pb2.LENGTH) == "length"
    assert finish_reason(generate_pb2.STOP) == finish_reason(generate_pb2.EOS) == "stop"


def test_response_format_becomes_the_engines_constraint() -> None:
    def constraint(response_format: dict | None) -> generate_pb2.SamplingParams:
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}],
             "response_format": response_format}
        )  # fmt: skip
        return chat_to_pb(body, "", "").params

    assert not constraint(None).HasField("constraint")
    assert not constraint({"type": "text"}).HasField("constraint")
    assert constraint({"type": "json_object"}).constraint.json_object
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = constraint(
        {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    )
    assert params.constraint.WhichOneof("kind") == "json_schema"
    assert json.loads(params.constraint.json_schema) == schema


def test_a_schema_the_worker_refuses_names_response_format() -> None:
    error = api_error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.constraint.json_schema does not compile: Unsupported type 'frob'",
    )
    assert error.status == 400 and error.param == "response_format"
    assert error.message == (
        "response_format.json_schema.schema does not compile: Unsupported type 'frob'"
    )

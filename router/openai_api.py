"""The OpenAI HTTP API's shapes: request schemas, their translation to ``GenerateRequest``,
response / stream-chunk builders, and the one gRPC status → HTTP error mapping.

No FastAPI here (``router/gateway.py`` serves it); plain pydantic models and dicts, so the
translation is testable without a server. Fields OpenAI defines that we do not use are
ignored (``extra="ignore"``), like OpenAI ignores what it does not know; a field of the
wrong type is a 400 naming it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field

from common.pb import generate_pb2

OWNED_BY = "llmcluster"
MAX_TOP_LOGPROBS = 20
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# gRPC status → (HTTP status, OpenAI error type): the one table the gateway answers from.
_HTTP_BY_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
RETRY_AFTER_S = 1
"""Retry-After of a 429: the router's queue drains at decode speed, so soon."""


# Our validation names fields as GenerateRequest does; an OpenAI client knows them so:
# (our prefix, the OpenAI name that replaces it in the message, the error's ``param``).
# The constraint a response_format became is named by that field (a schema the worker's
# compiler refuses is "response_format.json_schema.schema does not compile: <why>").
_OPENAI_FIELD_NAMES = (
    ("params.max_new_tokens", "max_tokens", "max_tokens"),
    ("params.temperature", "temperature", "temperature"),
    ("params.top_p", "top_p", "top_p"),
    ("params.logprobs", "top_logprobs", "top_logprobs"),
    ("params.stop", "stop", "stop"),
    ("params.seed", "seed", "seed"),
    ("params.constraint.json_schema", "response_format.json_schema.schema", "response_format"),
    ("params.constraint.json_object", "response_format", "response_format"),
    ("params.constraint", "response_format", "response_format"),
    ("messages", "messages", "messages"),
    ("prompt", "prompt", "prompt"),
)


def _openai_field(message: str) -> tuple[str, str | None]:
    """(message with our field name replaced by OpenAI's, the param) for a message
    that starts with a field name, else (message, None)."""
    for ours, theirs, param in _OPENAI_FIELD_NAMES:
        if message.startswith(ours):
            return theirs + message[len(ours) :], param
    return message, None


def api_error_from_status(
    code: grpc.StatusCode, message: str, *, not_found_code: str | None = None
) -> ApiError:
    """The HTTP error a client sees for a gRPC status (``not_found_code``: the OpenAI
    ``code`` of a 404, e.g. ``model_not_found``)."""
    status, kind = _HTTP_BY_STATUS.get(code, (500, "server_error"))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        message, field_name = _openai_field(message)
        return ApiError(status, message, type=kind, param=field_name)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    error_code = {
        401: "invalid_api_key",
        404: not_found_code,
        429: "rate_limit_exceeded",
        503: "service_unavailable",
        504: "timeout",
    }.get(status)
    param = "model" if error_code == "model_not_found" else None
    return ApiError(status, message, type=kind, param=param, code=error_code, headers=headers)


# ---- requests ---------------------------------------------------------------------------


class RequestBody(BaseModel):
    """Base of every gateway request body: unknown fields are ignored, as OpenAI does; a
    value of the wrong JSON type is a 400 (strict: "5" is no integer, 1 is a float)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(RequestBody):
    type: str
    text: str | None = None


class ChatMessageIn(RequestBody):
    # The roles our chat template knows (common.validation.CHAT_ROLES) and their aliases
    # (_ROLE_ALIASES), declared so the OpenAPI document says what a 400 would otherwise.
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(min_length=1)] | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(RequestBody):
    include_usage: bool = False


class JsonSchemaFormat(RequestBody):
    """``response_format.json_schema``: ``schema`` is the JSON Schema the answer obeys;
    ``strict`` is accepted, and always holds (the engine masks every token)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """``response_format``: ``text`` (free), ``json_object`` (any JSON object) or
    ``json_schema`` (one JSON value valid under ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(RequestBody):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # Extension (vLLM has it too): decode past EOS up to max_tokens, for load tests.
    ignore_eos: bool = False


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


# Roles OpenAI has that our chat template knows under another name.
_ROLE_ALIASES = {"developer": "system"}


def _content_text(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"messages[{index}].content[{j}]: only text parts are supported, got {part.type!r}",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def constraint_of(response_format: ResponseFormat | None) -> generate_pb2.Constraint | None:
    """The engine's structured-output constraint for a ``response_format`` (None: free
    text). Shape errors are 400s naming the field; whether the schema compiles is the
    worker's to say (INVALID_ARGUMENT with the compiler's message)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return generate_pb2.Constraint(json_object=True)
    if response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None:
            raise ApiError(
                400,
                "response_format.json_schema is required when response_format.type is "
                "'json_schema' (an object with name and schema)",
                param="response_format",
            )
        if spec.schema_ is None:
            raise ApiError(
                400,
                "response_format.json_schema.schema is required: the JSON Schema the answer "
                "must follow",
                param="response_format",
            )
        return generate_pb2.Constraint(json_schema=json.dumps(spec.schema_))
    raise ApiError(
        400,
        f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
        f"got {response_format.type!r}",
        param="response_format",
    )


def _sampling_params(
    body: _SamplingFields, max_tokens: int | None, logprobs: int
) -> generate_pb2.SamplingParams:
    if body.n is not None and body.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    params = generate_pb2.SamplingParams(logprobs=logprobs, ignore_eos=body.ignore_eos)
    constraint = constraint_of(body.response_format)
    if constraint is not None:
        params.constraint.CopyFrom(constraint)
    if max_tokens is not None:
        params.max_new_tokens = max_tokens
    if body.temperature is not None:
        params.temperature = body.temperature
    else:
        # OpenAI's default temperature is 1; ours (0 = greedy) is kept only when asked.
        params.temperature = 1.0
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.seed is not None:
        params.seed = body.seed % (1 << 64)  # OpenAI seeds are signed; ours uint64
    if body.stop is not None:
        params.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return params


def chat_to_pb(
    body: ChatCompletionRequest, model: str, adapter: str
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest of a chat completion (``model``/``adapter`` already resolved)."""
    logprobs = 0
    if body.logprobs:
        logprobs = body.top_logprobs or 0
        # Our logprobs field counts alternatives; the chosen token's logprob comes with any
        # positive count, so logprobs=true with no alternatives asks for one and drops it.
        logprobs = max(logprobs, 1)
    messages = [
        generate_pb2.ChatMessage(
            role=_ROLE_ALIASES.get(m.role, m.role), content=_content_text(m, i)
        )
        for i, m in enumerate(body.messages)
    ]
    return generate_pb2.GenerateRequest(
        model=model,
        adapter=adapter,
        messages=messages,
        params=_sampling_params(body, body.max_completion_tokens or body.max_tokens, logprobs),
        user=body.user or "",  # sticky traffic-split key
    )


def completion_to_pb(
    body: CompletionRequest, model: str, adapter: str
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest of a (legacy) completion."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(
                400,
                f"prompt must be one string (one choice per request), got {len(prompt)}",
                param="prompt",
            )
        prompt = prompt[0]
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    logprobs = body.logprobs or 0
    return generate_pb2.GenerateRequest(
        model=model,
        adapter=adapter,
        prompt=prompt,
        params=_sampling_params(
            body, body.max_tokens, max(logprobs, 1) if body.logprobs is not None else 0
        ),
        user=body.user or "",  # sticky traffic-split key
    )


# ---- responses --------------------------------------------------------------------------


def finish_reason(reason: int) -> str:
    """OpenAI's finish_reason for ours: a stop string and EOS are both "stop"."""
    return "length" if reason == generate_pb2.LENGTH else "stop"


def usage_dict(usage: generate_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: Any, top: int) -> dict[str, Any]:
    """``choices[].logprobs`` of chat: one entry per token with ``top`` alternatives."""
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": _token_bytes(t.text),
                "top_logprobs": [
                    {"token": a.text, "logprob": a.logprob, "bytes": _token_bytes(a.text)}
                    for a in list(t.top_logprobs)[:top]
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Any, top: int, offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of completions (the legacy parallel-array shape)."""
    offsets, position = [], offset
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.text: a.logprob for a in list(t.top_logprobs)[:top]} for t in tokens],
        "text_offset": offsets,
    }


@dataclass
class ResponseHeader:
    """What every chunk and response of one request repeats."""

    id: str
    model: str
    created: int
    chat: bool

    @classmethod
    def new(cls, request_id: str, model: str, chat: bool) -> ResponseHeader:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(prefix + request_id, model, int(time.time()), chat)

    def fields(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


ChatObject = Literal["chat.completion", "chat.completion.chunk"]


def model_entry(entry: generate_pb2.ModelEntry, created: int) -> dict[str, Any]:
    """One ``GET /v1/models`` item: base models by name, adapters as ``name@version``
    with ``parent`` / ``root`` naming the base model (as vLLM does for LoRA)."""
    if entry.kind == generate_pb2.ADAPTER:
        return {
            "id": f"{entry.name}@{entry.version}",
            "object": "model",
            "created": entry.created_unix_ms // 1000 if entry.created_unix_ms else created,
            "owned_by": OWNED_BY,
            "parent": entry.base_model,
            "root": entry.base_model,
        }
    return {
        "id": entry.name,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
        "parent": None,
        "root": entry.name,
    }

"""The gateway's OpenAPI document (``GET /openapi.json``): request bodies and responses.

The endpoints read their bodies themselves (so a malformed body is a 400 in OpenAI's
shape, not FastAPI's 422), which leaves FastAPI's generated document without request or
response schemas. This module adds them: the request models of ``router/openai_api.py``
and ``router/gateway_finetune.py``, the response shapes below (what the handlers build as
dicts), and the OpenAI error object for every error status an operation can answer.
``tests/test_gateway_schema.py`` holds the server to this document with schemathesis.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from router.gateway_finetune import JobCreate
from router.openai_api import ChatCompletionRequest, CompletionRequest


class _Out(BaseModel):
    """A response shape: fields we always send; clients must ignore others (OpenAI adds)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    """Every error: ``{"error": {message, type, param, code}}``."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


FinishReason = Literal["stop", "length"]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None


class ChatChoice(_Out):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice] = Field(min_length=1, max_length=1)
    usage: Usage


class CompletionChoice(_Out):
    index: int = Field(ge=0)
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason


class Completion(_Out):
    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice] = Field(min_length=1, max_length=1)
    usage: Usage


class ChunkDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int = Field(ge=0)
    delta: ChunkDelta
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    """One SSE event of a streamed chat completion (the usage chunk has no choices)."""

    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class CompletionChunkChoice(_Out):
    index: int = Field(ge=0)
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: FinishReason | None


class CompletionChunk(_Out):
    """One SSE event of a streamed completion."""

    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class Model(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None
    root: str | None


class ModelList(_Out):
    object: Literal["list"]
    data: list[Model]


class FileObject(_Out):
    id: str = Field(pattern=r"^file-[0-9a-f]{24}$")
    object: Literal["file"]
    bytes: int = Field(ge=0)
    created_at: int
    filename: str
    purpose: Literal["fine-tune"]
    status: str


class FileList(_Out):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(_Out):
    id: str
    object: Literal["file"]
    deleted: bool


class Job(_Out):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: dict[str, Any]
    training_file: str | None
    trained_tokens: int | None
    error: dict[str, Any] | None
    estimated_finish: int | None


class JobList(_Out):
    object: Literal["list"]
    data: list[Job]
    has_more: bool


class JobEvent(_Out):
    object: Literal["fine_tuning.job.event"]
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: str


class JobEventList(_Out):
    object: Literal["list"]
    data: list[JobEvent]
    has_more: bool


class CheckpointList(_Out):
    object: Literal["list"]
    data: list[dict[str, Any]]
    has_more: bool


class Health(_Out):
    status: Literal["ok", "unavailable"]


# The error statuses each kind of operation answers (api_error_from_status's table).
_GENERATE_ERRORS = (400, 401, 403, 404, 413, 429, 503, 504)
_READ_ERRORS = (400, 401, 403, 404, 429, 503, 504)
_FINETUNE_ERRORS = (400, 401, 403, 404, 409, 413, 429, 503, 504)

# (path, method) → (request model or None, 200's JSON model or None for plain text, the
# error statuses it answers in OpenAI's shape).
_OPERATIONS: dict[
    tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None, tuple[int, ...]]
] = {
    ("/health", "get"): (None, Health, ()),
    ("/v1/models", "get"): (None, ModelList, _READ_ERRORS),
    ("/v1/models/{model_id}", "get"): (None, Model, _READ_ERRORS),
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, ChatCompletion, _GENERATE_ERRORS),
    ("/v1/completions", "post"): (CompletionRequest, Completion, _GENERATE_ERRORS),
    ("/v1/files", "post"): (None, FileObject, _FINETUNE_ERRORS),
    ("/v1/files", "get"): (None, FileList, _READ_ERRORS),
    ("/v1/files/{file_id}", "get"): (None, FileObject, _READ_ERRORS),
    ("/v1/files/{file_id}", "delete"): (None, FileDeleted, _READ_ERRORS),
    ("/v1/files/{file_id}/content", "get"): (None, None, _READ_ERRORS),
    ("/v1/fine_tuning/jobs", "post"): (JobCreate, Job, _FINETUNE_ERRORS),
    ("/v1/fine_tuning/jobs", "get"): (None, JobList, _READ_ERRORS),
    ("/v1/fine_tuning/jobs/{job_id}", "get"): (None, Job, _READ_ERRORS),
    ("/v1/fine_tuning/jobs/{job_id}/cancel", "post"): (None, Job, _FINETUNE_ERRORS),
    ("/v1/fine_tuning/jobs/{job_id}/events", "get"): (None, JobEventList, _READ_ERRORS),
    ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get"): (None, CheckpointList, _READ_ERRORS),
}
_LIMIT = {
    "name": "limit", "in": "query", "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
}  # fmt: skip
_AFTER = {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}}
_QUERY: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/v1/fine_tuning/jobs", "get"): [_AFTER, _LIMIT],
    ("/v1/fine_tuning/jobs/{job_id}/events", "get"): [_AFTER, _LIMIT],
    ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get"): [_AFTER, _LIMIT],
}
_FILE_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "JSONL: one JSON object a line"},
                    "purpose": {"type": "string", "enum": ["fine-tune"]},
                },
                "required": ["file", "purpose"],
            }
        }
    },
}  # fmt: skip
_STATUS_TEXT = {
    200: "OK", 400: "Bad request: the message and param name the problem",
    401: "Missing or unknown API key", 403: "The key may not do this",
    404: "No such model, file or job", 409: "Conflict", 413: "Request body too large",
    429: "Rate limited or queue full (Retry-After says when to retry)",
    503: "No worker can serve it now", 504: "Deadline exceeded",
}  # fmt: skip


_CHUNKS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionChunk,
}


def _sse_event(chunk: dict[str, str], error: dict[str, str]) -> dict[str, Any]:
    """One event of a stream=true answer (OpenAPI 3.1: ``schema`` of an event stream
    describes each event): ``data`` is a JSON chunk, an error object (an error after the
    headers were sent), or the final ``[DONE]``."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [chunk, error]},
                    },
                ]
            }
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_model(components: dict[str, Any], model: type[BaseModel], mode: str) -> dict[str, str]:
    """Puts ``model``'s JSON Schema (and the models it uses) into ``components``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, schema)
    return _ref(model.__name__)


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for ``app`` with the bodies, responses and errors above."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description="OpenAI-compatible API of an llmcluster router (chat, completions, "
        "models, files, fine-tuning). Errors have OpenAI's shape.",
        routes=app.routes,
    )
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    error = _add_model(components, ErrorResponse, "serialization")
    for (path, method), (request_model, reply_model, errors) in _OPERATIONS.items():
        operation = doc["paths"].get(path, {}).get(method)
        if operation is None:
            continue
        if request_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _add_model(components, request_model, "validation")
                    }
                },
            }
        elif (path, method) == ("/v1/files", "post"):
            operation["requestBody"] = _FILE_UPLOAD
        parameters = [p for p in operation.get("parameters", []) if p.get("in") == "path"]
        operation["parameters"] = parameters + _QUERY.get((path, method), [])
        if not operation["parameters"]:
            del operation["parameters"]
        if reply_model is None:
            ok: dict[str, Any] = {"text/plain": {"schema": {"type": "string"}}}
        else:
            ok = {"application/json": {"schema": _add_model(components, reply_model,
                                                            "serialization")}}  # fmt: skip
        chunk = _CHUNKS.get(path)
        if chunk is not None:
            ok["text/event-stream"] = {
                "schema": _sse_event(_add_model(components, chunk, "serialization"), error)
            }
        responses: dict[str, Any] = {"200": {"description": _STATUS_TEXT[200], "content": ok}}
        for status in errors:
            responses[str(status)] = {
                "description": _STATUS_TEXT[status],
                "content": {"application/json": {"schema": error}},
            }
        if path == "/health":  # no worker: 503 with the same body, status "unavailable"
            responses["503"] = {"description": _STATUS_TEXT[503], "content": ok}
        operation["responses"] = responses
    return doc


def install(app: FastAPI) -> None:
    """Serves :func:`openapi_document` at ``app.openapi_url`` (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""The OpenAI-compatible HTTP gateway, served in the router process.

A FastAPI app run by uvicorn on the router's own event loop (``start_gateway`` returns
once the socket is bound). Every endpoint calls the router's servicers in process —
:class:`~router.service.GenerateService` and :class:`~router.finetune_proxy.FineTuneProxy`
— through :class:`CallContext`, an in-process stand-in for ``grpc.aio.ServicerContext``,
so admission, validation, routing, metrics and spans stay exactly where the gRPC API has
them (no second gRPC hop, no second copy of the rules).

Streaming follows OpenAI's SSE shape: a role delta first, content deltas, the finish
reason on the last choice chunk, with ``stream_options.include_usage`` a final chunk
with empty ``choices`` and the usage, then ``data: [DONE]``. A client that disconnects
mid-stream cancels the request: Starlette cancels the body iterator, whose ``aclosing``
reaches the router's generator, which sends ``Cancel`` to the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import tracing
from common.auth import Admission, Tenant, set_current_tenant
from common.config import home_dir
from common.errors import InvalidArgument, RequestError, status_of
from common.listen import PortInUse
from common.metrics import API_OPENAI, RouterMetrics
from common.pb import generate_pb2
from common.validation import parse_adapter_ref
from router.cluster import Cluster
from router.config import RouterConfig
from router.finetune_proxy import FineTuneProxy
from router.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHeader,
    api_error_from_status,
    chat_logprobs,
    chat_to_pb,
    completion_logprobs,
    completion_to_pb,
    finish_reason,
    model_entry,
    usage_dict,
)
from router.service import GenerateService

logger = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_CACHE_S = 2.0
"""How long a ListModels answer serves model lookups; a name it lacks refreshes it at
once, so an adapter registered a moment ago is found on first use."""
FILES_PREFIX = "/v1/files"
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class CallContext:
    """What the router's servicers need of ``grpc.aio.ServicerContext``, for an HTTP call.

    ``invocation_metadata`` carries the HTTP request's ``authorization`` header (see
    :func:`call_context`) and the gateway span's W3C context, so bearer-token admission
    and trace parenting read it exactly as they read a gRPC caller's metadata.
    ``abort`` raises the :class:`RequestError` the gateway turns into an HTTP error.
    ``api`` labels the servicers' latency histograms, and tells them the gateway counts
    the call in ``llmcluster_requests_total`` itself (once, as ``openai.<endpoint>``).
    """

    api = API_OPENAI

    def __init__(
        self,
        metadata: Sequence[tuple[str, str]],
        peer: str = "",
        timeout_s: float | None = None,
    ) -> None:
        self._metadata = tuple(metadata)
        self._peer = peer
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing_metadata = tuple(metadata)

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no TLS peer identity over plain HTTP

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RequestError(details, code)


def call_context(request: Request, timeout_s: float | None = None) -> CallContext:
    """The one place an HTTP request becomes a servicer call.

    Auth hook: ``Authorization: Bearer <token>`` is forwarded as gRPC's ``authorization``
    metadata, so the router's admission (tokens → tenants, quotas) decides for HTTP
    exactly as for gRPC; nothing else in the gateway looks at credentials.
    """
    metadata: list[tuple[str, str]] = []
    authorization = request.headers.get("authorization")
    if authorization:
        metadata.append(("authorization", authorization))
    # The current span is the gateway's HTTP span: the router span becomes its child.
    metadata.extend(tracing.inject_to_dict().items())
    client = request.client
    peer = f"ipv4:{client.host}:{client.port}" if client else ""
    return CallContext(metadata, peer, timeout_s)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _api_error(exc: BaseException, *, not_found_code: str | None = None) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BodyTooLarge):  # for spans and metrics; BodyLimit answers it
        return ApiError(413, f"request body is larger than {exc.limit} bytes")
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("internal error in the HTTP gateway", exc_info=exc)
    return api_error_from_status(code, message, not_found_code=not_found_code)


_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "any"})


def _union_member(part: str) -> bool:
    return part in _UNION_MEMBERS or "[" in part or part.startswith(("constrained-", "function-"))


def _validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    """A 400 naming the first offending field (``messages.0.role`` → ``messages[0].role``)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # pydantic names the union member it tried ("content.str", "schema.dict[str,any]"):
    # not a field the client sent, so not in the name we show.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(str(p))]
    param = ""
    for part in loc:
        param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "missing":
        return ApiError(400, f"{param} is required", param=param or None)
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return ApiError(400, message, param=param or None)


Admit = Callable[[str, Any], tuple[Tenant, Admission]]
"""The router's admission (``AuthInterceptor.admit``): token -> tenant -> quotas."""

# The admitted call of the current HTTP request: its responses are shown to it, so a
# tenant's tokens-per-minute bucket is charged for HTTP use as for gRPC.
_ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "llmcluster_http_admission", default=None
)


def observe_admitted(response: Any) -> None:
    """Shows one servicer response to the current HTTP request's admission, if any."""
    admission = _ADMISSION.get()
    if admission is not None:
        admission.observe(response)


def _grpc_method(method: str, path: str) -> str | None:
    """The gRPC method an HTTP route stands for, to admission (None: open, like health)."""
    if path.startswith("/v1/fine_tuning") or path.startswith(FILES_PREFIX):
        name = "CreateJob" if method == "POST" and path.rstrip("/").endswith("/jobs") else "GetJob"
        return f"/llmcluster.v1.FineTune/{name}"
    if path.startswith("/v1/models"):
        return "/llmcluster.v1.Generate/ListModels"
    if path.startswith("/v1/"):
        return "/llmcluster.v1.Generate/Generate"
    return None  # the playground page and /health: no data, no work


class TenantAdmission:
    """ASGI middleware: the router's own admission (the same tenants, keys and quotas as
    its gRPC interceptor) for every API route, before the app runs. In-process calls do
    not pass the gRPC interceptor, so without this the gateway would be a way around it."""

    def __init__(self, app: Any, admit: Admit) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method = (
            _grpc_method(scope.get("method", ""), scope["path"])
            if scope["type"] == "http"
            else None
        )
        if method is None:
            await self.app(scope, receive, send)
            return
        metadata = [
            ("authorization", value.decode("latin-1"))
            for name, value in scope.get("headers", ())
            if name == b"authorization"
        ]
        try:
            tenant, admission = self.admit(method, metadata)
        except RequestError as exc:
            error = api_error_from_status(exc.code, exc.message)
            for key, value in getattr(exc, "trailing_metadata", None) or ():
                if key == "retry-after-ms":
                    error.headers["Retry-After"] = str(max(1, -(-int(value) // 1000)))
            await _error_response(error)(scope, receive, send)
            return
        set_current_tenant(tenant)
        token = _ADMISSION.set(admission)
        try:
            await self.app(scope, receive, send)
        finally:
            _ADMISSION.reset(token)
            admission.release()


class BodyLimit:
    """ASGI middleware: refuses bodies over a size limit with 413 before the app reads
    them (by Content-Length, and by counting for chunked uploads), so a huge body costs
    neither memory nor a file."""

    def __init__(self, app: Any, max_json_bytes: int, max_file_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_file_bytes = max_file_bytes + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (
            self.max_file_bytes if scope["path"].startswith(FILES_PREFIX) else self.max_json_bytes
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _discard_body(receive)
                await _send_too_large(send, limit)
                return
        seen = 0
        body_left = True  # the client has more of the body to send

        async def counting_receive() -> Any:
            nonlocal seen, body_left
            message = await receive()
            if message["type"] == "http.request":
                body_left = bool(message.get("more_body", False))
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            if body_left:
                await _discard_body(receive)
            await _send_too_large(send, limit)


DISCARD_BODY_S = 10.0
"""How long a refused body is read and dropped before its 413 (see _discard_body)."""


async def _discard_body(receive: Any) -> None:
    """Reads what the client still sends of a refused body, dropping it, until its end
    (bounded by DISCARD_BODY_S), before the 413 goes out: a socket closed with unread data
    sends a reset, which can destroy the 413 before the client reads it (nginx's "lingering
    close" does the same). Before, not after: once the response is complete, uvicorn
    stops reading and closes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_BODY_S):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


class BodyTooLarge(Exception):
    """Raised from a request's ``receive`` once its body passes the limit; BodyLimit
    answers 413. Code that reads a body must let it through (not turn it into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


async def _send_too_large(send: Any, limit: int) -> None:
    body = json.dumps(
        ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large").body()
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class ModelCatalog:
    """Resolves an OpenAI ``model`` to (base model, adapter ref) from ListModels."""

    generate: GenerateService
    entries: tuple[generate_pb2.ModelEntry, ...] = ()
    fetched_at: float = 0.0

    async def list(self, request: Request, *, refresh: bool = False) -> tuple[Any, ...]:
        if refresh or time.monotonic() - self.fetched_at > MODEL_CACHE_S:
            reply = await self.generate.ListModels(
                generate_pb2.ListModelsRequest(), call_context(request)
            )
            self.entries = tuple(reply.models)
            self.fetched_at = time.monotonic()
        return self.entries

    async def resolve(self, name: str, request: Request) -> tuple[str, str]:
        """``model`` → (GenerateRequest.model, GenerateRequest.adapter); 404 if unknown."""
        if not name:
            raise ApiError(
                404, "model is empty: name a base model or an adapter name[@version]",
                param="model", code="model_not_found",
            )  # fmt: skip
        for refresh in (False, True):
            found = self._match(name, await self.list(request, refresh=refresh))
            if found is not None:
                return found
        raise ApiError(
            404,
            f"the model {name!r} does not exist (GET /v1/models lists base models and "
            "adapters as name@version)",
            param="model",
            code="model_not_found",
        )

    @staticmethod
    def _match(name: str, entries: Sequence[generate_pb2.ModelEntry]) -> tuple[str, str] | None:
        bases = {e.name for e in entries if e.kind == generate_pb2.BASE}
        if name in bases:
            return name, ""
        try:
            adapter, version = parse_adapter_ref(name)
        except InvalidArgument:
            return None
        versions = [e for e in entries if e.kind == generate_pb2.ADAPTER and e.name == adapter]
        if version != "latest":
            versions = [e for e in versions if e.version == version]
        if not versions:
            return None
        entry = max(versions, key=lambda e: int(e.version) if e.version.isdigit() else 0)
        if entry.method == "full":  # a model of its own, named by its store ref
            return f"{entry.name}@{entry.version}", ""
        # Route by the adapter's base model when a worker serves it under that name.
        base = entry.base_model if entry.base_model in bases else ""
        return base, f"{entry.name}@{entry.version}"


class Gateway:
    """The app's endpoints over the router's servicers (see module docstring)."""

    def __init__(
        self,
        config: RouterConfig,
        cluster: Cluster,
        generate: GenerateService,
        finetune: FineTuneProxy,
        metrics: RouterMetrics | None,
        admit: Admit | None = None,
    ) -> None:
        self.config = config
        self.admit = admit
        self.cluster = cluster
        self.generate = generate
        self.finetune = finetune
        self.metrics = metrics
        self.catalog = ModelCatalog(generate)
        self._tracer = tracing.get_tracer(__name__)
        files_dir = Path(config.files_dir) if config.files_dir else home_dir() / "files"
        # Local import: the fine-tuning half lives in its own module.
        from router.gateway_finetune import FineTuningApi

        self.fine_tuning = FineTuningApi(self, files_dir, config.max_file_bytes)
        self.app = self._build_app()

    # ---- app ------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(
            title="llmcluster OpenAI-compatible API",
            version="1",
            docs_url=None,
            redoc_url=None,
            # Our own spans and metrics (common/tracing, http_span) are the one tracing
            # setup: FastAPI's native telemetry would add a second SERVER span per request.
            telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
        )

        @app.exception_handler(ApiError)
        async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
            return _error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
            return _error_response(_validation_error(exc))

        @app.exception_handler(StarletteHTTPException)
        async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            code = "not_found" if exc.status_code == 404 else None
            return _error_response(ApiError(exc.status_code, str(exc.detail), type=kind, code=code))

        app.add_api_route("/", self.playground, methods=["GET"], include_in_schema=False)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.fine_tuning.add_routes(app)
        from router import openapi_doc  # local: it imports the fine-tuning half's models

        openapi_doc.install(app)
        app.add_middleware(
            BodyLimit,
            max_json_bytes=self.config.max_http_body_bytes,
            max_file_bytes=self.config.max_file_bytes,
        )
        if self.admit is not None:  # outermost: nothing runs for a caller refused here
            app.add_middleware(TenantAdmission, admit=self.admit)
        return app

    @contextlib.contextmanager
    def http_span(self, request: Request, route: str, **attributes: Any) -> Iterator[trace.Span]:
        """The SERVER span of one HTTP request (OTel HTTP conventions), parented by the
        request's W3C ``traceparent``; current inside the block."""
        with self.started_span(request, route, **attributes) as span, trace.use_span(span):
            yield span

    @contextlib.contextmanager
    def started_span(self, request: Request, route: str, **attributes: Any) -> Iterator[trace.Span]:
        span = self.start_span(request, route, **attributes)
        try:
            yield span
        except BaseException as exc:
            self.end_span(span, exc)
            raise
        self.end_span(span, None)

    def start_span(self, request: Request, route: str, **attributes: Any) -> trace.Span:
        carrier = {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}
        return self._tracer.start_span(
            f"{request.method} {route}",
            context=tracing.context_from_dict(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.url.path,
                "url.scheme": request.url.scheme,
                **attributes,
            },
        )

    def end_span(self, span: trace.Span, exc: BaseException | None, status: int = 200) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            span.set_attribute("http.response.status_code", 499)
        elif exc is not None:
            error = _api_error(exc)
            span.set_attribute("http.response.status_code", error.status)
            if error.status >= 500:
                tracing.record_error(span, exc)
        else:
            span.set_attribute("http.response.status_code", status)
        span.end()

    def record(self, api: str, exc: BaseException | None) -> None:
        """Counts one HTTP call in llmcluster_requests_total, method ``openai.<api>``."""
        if self.metrics is None:
            return
        if isinstance(exc, BodyTooLarge):
            exc = _api_error(exc)
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code: Any = grpc.StatusCode.CANCELLED
        elif exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, ApiError):
            code = {
                400: "INVALID_ARGUMENT",
                404: "NOT_FOUND",
                413: "INVALID_ARGUMENT",
                499: "CANCELLED",
            }.get(exc.status, "UNKNOWN")
        else:
            code = status_of(exc)[0]
        self.metrics.record_request(f"openai.{api}", code)

    async def run(
        self, api: str, request: Request, route: str, body: Callable[[], Awaitable[Any]]
    ) -> Any:
        """A unary endpoint: its span, its metric, errors in OpenAI's shape."""
        error: BaseException | None = None
        with self.http_span(request, route):
            try:
                return await body()
            except BaseException as exc:
                error = exc
                if isinstance(exc, Exception) and not isinstance(exc, BodyTooLarge):
                    raise _api_error(exc, not_found_code="not_found") from exc
                raise
            finally:
                self.record(api, error)

    # ---- endpoints ------------------------------------------------------------------------

    async def playground(self) -> HTMLResponse:
        page = resources.files("router").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    async def health(self) -> JSONResponse:
        healthy = self.cluster.healthy_count() > 0
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503
        )

    async def list_models(self, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            entries = await self.catalog.list(request, refresh=True)
            created = int(time.time())
            return {"object": "list", "data": [model_entry(e, created) for e in entries]}

        return await self.run("models.list", request, "/v1/models", body)

    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        async def body() -> dict[str, Any]:
            created = int(time.time())
            for entry in await self.catalog.list(request, refresh=True):
                item = model_entry(entry, created)
                if item["id"] == model_id:
                    return item
            raise ApiError(
                404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
            )

        return await self.run("models.retrieve", request, "/v1/models/{model}", body)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        api = "chat.completions" if chat else "completions"
        route = "/v1/chat/completions" if chat else "/v1/completions"
        span = self.start_span(
            request,
            route,
            **{tracing.GEN_AI_OPERATION_NAME: tracing.GEN_AI_OPERATION_CHAT if chat
               else tracing.GEN_AI_OPERATION_TEXT_COMPLETION},
        )  # fmt: skip
        try:
            with trace.use_span(span):
                raw = await _json_body(request)
                body: ChatCompletionRequest | CompletionRequest = (
                    ChatCompletionRequest.model_validate(raw)
                    if chat
                    else CompletionRequest.model_validate(raw)
                )
                span.set_attribute(tracing.GEN_AI_REQUEST_MODEL, body.model)
                model, adapter = await self.catalog.resolve(body.model, request)
                pb = (
                    chat_to_pb(body, model, adapter)  # type: ignore[arg-type]
                    if chat
                    else completion_to_pb(body, model, adapter)  # type: ignore[arg-type]
                )
                ctx = call_context(request)
                if body.stream:
                    stream = StreamPump(self.generate.GenerateStream(pb, ctx))
                    # The first message before any header: an error here (validation,
                    # unknown adapter, queue full) is still a proper HTTP status.
                    try:
                        first = await stream.next()
                    except BaseException:
                        await stream.close()
                        raise
                    assert first is not None, "a stream ends with its finish message"
                else:
                    reply = await _unless_disconnected(request, self.generate.Generate(pb, ctx))
                    observe_admitted(reply)
        except BaseException as exc:
            error = exc
            if isinstance(exc, ValidationError):
                error = _validation_error(exc)
            elif isinstance(exc, Exception) and not isinstance(exc, BodyTooLarge):
                error = _api_error(exc, not_found_code="model_not_found")
            self.end_span(span, error)
            self.record(api, error)
            if error is exc:
                raise
            raise error from exc
        header = ResponseHeader.new(reply.request_id if not body.stream else first.request_id,
                                    body.model, chat)  # fmt: skip
        if not body.stream:
            self.end_span(span, None)
            self.record(api, None)
            return JSONResponse(_whole_response(header, body, reply))
        return StreamingResponse(
            self._sse_stream(api, span, header, body, first, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse_stream(
        self,
        api: str,
        span: trace.Span,
        header: ResponseHeader,
        body: ChatCompletionRequest | CompletionRequest,
        first: generate_pb2.GenerateStreamResponse,
        stream: StreamPump,
    ) -> AsyncIterator[bytes]:
        """The SSE body; its cancellation (client gone) closes ``stream``, which cancels
        the request on the worker."""
        chat = header.chat
        object_name = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        top = _top_logprobs(body)
        offset = 0
        error: BaseException | None = None

        def chunk(choice: dict[str, Any]) -> bytes:
            payload = {**header.fields(object_name), "choices": [{"index": 0, **choice}]}
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            async with contextlib.aclosing(stream):
                if chat:
                    yield chunk(
                        {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                    )  # fmt: skip
                message: generate_pb2.GenerateStreamResponse | None = first
                while message is not None:
                    if message.text or (top is not None and len(message.tokens)):
                        logprobs = None
                        if top is not None:
                            logprobs = (
                                chat_logprobs(message.tokens, top)
                                if chat
                                else completion_logprobs(message.tokens, top, offset)
                            )
                        offset += len(message.text)
                        if chat:
                            yield chunk(
                                {"delta": {"content": message.text}, "logprobs": logprobs,
                                 "finish_reason": None}
                            )  # fmt: skip
                        else:
                            yield chunk(
                                {"text": message.text, "logprobs": logprobs, "finish_reason": None}
                            )
                    if message.HasField("usage"):
                        reason = finish_reason(message.finish_reason)
                        if chat:
                            yield chunk({"delta": {}, "logprobs": None, "finish_reason": reason})
                        else:
                            yield chunk({"text": "", "logprobs": None, "finish_reason": reason})
                        span.set_attributes(
                            tracing.genai_usage_attributes(
                                input_tokens=message.usage.prompt_tokens,
                                output_tokens=message.usage.completion_tokens,
                                finish_reason=reason,
                            )
                        )
                        if include_usage:
                            usage = {
                                **header.fields(object_name),
                                "choices": [],
                                "usage": usage_dict(message.usage),
                            }
                            yield _sse(usage)
                    message = await stream.next()
            yield SSE_DONE
        except Exception as exc:
            # Headers are sent: the error travels as an SSE event, as OpenAI does.
            error = exc
            yield _sse(_api_error(exc, not_found_code="model_not_found").body())
            yield SSE_DONE
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.end_span(span, error)
            self.record(api, error)


class StreamPump:
    """Runs a servicer's response stream to its end in a task of its own.

    The servicer's span is entered and left by that one task: a stream whose first message
    is read by the endpoint and the rest by Starlette's response task would leave its
    span in a context it did not enter. ``close`` cancels the task, which closes the
    servicer's generator and so cancels the request on the worker.
    """

    _END = object()

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                observe_admitted(item)
                self._queue.put_nowait(item)
            self._queue.put_nowait(self._END)
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def next(self) -> Any:
        """The next message, None at the end; re-raises the stream's error."""
        item = await self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _top_logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """Alternatives per token to show, or None when logprobs were not asked for."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _whole_response(
    header: ResponseHeader,
    body: ChatCompletionRequest | CompletionRequest,
    reply: generate_pb2.GenerateResponse,
) -> dict[str, Any]:
    top = _top_logprobs(body)
    reason = finish_reason(reply.finish_reason)
    if header.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text, "refusal": None},
            "logprobs": chat_logprobs(reply.tokens, top) if top is not None else None,
            "finish_reason": reason,
        }
        object_name = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": reply.text,
            "logprobs": completion_logprobs(reply.tokens, top, 0) if top is not None else None,
            "finish_reason": reason,
        }
        object_name = "text_completion"
    return {
        **header.fields(object_name),
        "choices": [choice],
        "usage": usage_dict(reply.usage),
    }


DISCONNECT_POLL_S = 0.25
"""How often a non-streamed generation checks that its client is still there."""


async def _unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """``call``'s result; cancelled (so the worker frees the slot) if the client leaves.

    A streamed answer learns of a disconnect from Starlette; a whole answer sends nothing
    until the end, so it asks."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected before the answer was ready")
    finally:
        if not task.done():
            task.cancel()


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


class _EmbeddedServer(uvicorn.Server):
    """uvicorn on a loop it does not own: the router handles SIGTERM / SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningGateway:
    """A started gateway: its uvicorn server, serving task and bound address."""

    gateway: Gateway
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Stops accepting, lets open responses finish within ``grace_s``, then cancels."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace_s + 1.0)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def start_gateway(
    config: RouterConfig,
    cluster: Cluster,
    generate: GenerateService,
    finetune: FineTuneProxy,
    metrics: RouterMetrics | None,
    admit: Admit | None = None,
) -> RunningGateway:
    """Binds ``http_host:http_port`` (raises OSError naming the address if it cannot) and
    serves the gateway on the running loop."""
    assert config.http_port is not None
    host = config.http_host or config.host
    gateway = Gateway(config, cluster, generate, finetune, metrics, admit)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, config.http_port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # one rule for every port: exit 2 naming it
            raise PortInUse(config.http_port, "HTTP gateway port") from None
        raise OSError(
            exc.errno, f"HTTP gateway cannot bind {host}:{config.http_port}: {exc.strerror}"
        ) from exc
    sock.listen(1024)
    sock.setblocking(False)
    port = int(sock.getsockname()[1])
    uv_config = uvicorn.Config(
        gateway.app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(max(1, config.grace_s)),
    )
    server = _EmbeddedServer(uv_config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError(f"HTTP gateway on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.01)
    logger.info("HTTP gateway (OpenAI-compatible) on http://%s:%d", host, port)
    return RunningGateway(gateway, server, task, host, port)


__all__ = ["CallContext", "Gateway", "RunningGateway", "call_context", "start_gateway"]

"""API keys and tenants: the auth file, bearer-token lookup, and the admission interceptor.

The auth file (``--auth-file``) is TOML, one ``[[tenant]]`` table per tenant::

    [[tenant]]
    name = "team-a"
    key_sha256 = "<hex sha256 of the bearer token>"   # tokens are never stored
    requests_per_minute = 600      # optional; 0 or absent = unlimited
    tokens_per_minute = 100000     # optional; prompt + generated tokens
    max_concurrent = 16            # optional
    allow_finetune = true          # optional; default false

Clients send ``authorization: Bearer <token>`` metadata. The token's sha256 is
compared with every tenant's ``key_sha256`` by :func:`hmac.compare_digest` (no early
exit, so timing tells nothing about which key or how much of one matched).

:class:`AuthInterceptor` wraps every method handler of a server: it authenticates the
caller, refuses FineTune to tenants without ``allow_finetune``, runs the quota hook,
and makes the tenant visible to the handler as :func:`current_tenant` (spans, metrics,
job ownership) before the handler runs, so a refused call never reaches a servicer.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc

from common.errors import RequestError, Unauthenticated, status_of

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
TENANT_METADATA = "llmcluster-tenant"
"""Internal metadata: the router tells a worker which tenant a FineTune call is for.
Workers trust it because only routers (and operators) can reach them: a worker run
with ``--tls-client-ca`` completes handshakes only with certificate holders."""

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."
FINETUNE_SERVICE = "llmcluster.v1.FineTune"

_TENANT: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar(
    "llmcluster_tenant", default=None
)


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Tenant:
    """One tenant of the auth file. Limits of 0 mean unlimited."""

    name: str
    key_sha256: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    allow_finetune: bool = False


def hash_token(token: str) -> str:
    """The hex sha256 stored in the auth file for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe, no spaces)."""
    return "llmc-" + secrets.token_urlsafe(32)


_TENANT_HEADER = re.compile(r"^\s*\[\[\s*tenant\s*\]\]")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TYPES = {
    "name": str,
    "key_sha256": str,
    "requests_per_minute": int,
    "tokens_per_minute": int,
    "max_concurrent": int,
    "allow_finetune": bool,
}


def _line_of(lines: Sequence[str], tenant_index: int, key: str | None) -> int:
    """1-based line of the ``tenant_index``-th ``[[tenant]]`` header, or of ``key``
    inside that table (tomllib reports no positions for valid TOML)."""
    headers = [i for i, line in enumerate(lines) if _TENANT_HEADER.match(line)]
    if tenant_index >= len(headers):
        return 1
    start = headers[tenant_index]
    end = headers[tenant_index + 1] if tenant_index + 1 < len(headers) else len(lines)
    if key is not None:
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start, end):
            if pattern.match(lines[i]):
                return i + 1
    return start + 1


def parse_auth_file(text: str, source: str = "<auth file>") -> list[Tenant]:
    """The tenants of an auth file's text; AuthFileError names the line of any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = match.group(1) if match else "?"
        raise AuthFileError(f"{source}:{line}: not valid TOML: {exc}") from None
    lines = text.splitlines()

    def top_line(key: str) -> int:
        pattern = re.compile(rf"^\s*\[*\s*{re.escape(key)}\b")
        return next((i + 1 for i, line in enumerate(lines) if pattern.match(line)), 1)

    for key in data:
        if key != "tenant":
            raise AuthFileError(
                f"{source}:{top_line(key)}: unknown top-level key {key!r}; expected [[tenant]]"
            )
    entries = data.get("tenant", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AuthFileError(
            f"{source}:{top_line('tenant')}: 'tenant' must be an array of tables ([[tenant]])"
        )
    tenants: list[Tenant] = []
    seen_names: dict[str, int] = {}
    seen_keys: dict[str, str] = {}
    for index, entry in enumerate(entries):

        def fail(message: str, key: str | None = None, index: int = index) -> AuthFileError:
            return AuthFileError(f"{source}:{_line_of(lines, index, key)}: {message}")

        for key in entry:
            if key not in _TYPES:
                raise fail(f"unknown key {key!r} (allowed: {', '.join(_TYPES)})", key)
        for key in ("name", "key_sha256"):
            if key not in entry:
                raise fail(f"tenant is missing {key!r}")
        for key, value in entry.items():
            want = _TYPES[key]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise fail(f"{key} must be {want.__name__}, got {value!r}", key)
            if isinstance(value, int) and value < 0:
                raise fail(f"{key} must be >= 0 (0 = unlimited), got {value}", key)
        name, digest = entry["name"], entry["key_sha256"].lower()
        if not _NAME.match(name):
            raise fail(f"tenant name {name!r} must be 1-128 of [A-Za-z0-9._-]", "name")
        if not _HEX64.match(digest):
            raise fail("key_sha256 must be 64 hex digits (sha256 of the token)", "key_sha256")
        if name in seen_names:
            raise fail(f"tenant {name!r} appears twice (first at tenant #{seen_names[name] + 1})")
        if digest in seen_keys:
            raise fail(f"key_sha256 already belongs to tenant {seen_keys[digest]!r}", "key_sha256")
        seen_names[name], seen_keys[digest] = index, name
        tenants.append(Tenant(**{**entry, "key_sha256": digest}))
    return tenants


def load_auth_file(path: str | Path) -> AuthTable:
    """Reads and checks an auth file (AuthFileError with file:line on any problem)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"{path}: cannot read auth file: {exc}") from None
    return AuthTable(parse_auth_file(text, str(path)), path=Path(path))


def append_tenant(path: str | Path, name: str, token: str, **limits: Any) -> Tenant:
    """Appends a tenant with ``token``'s hash to the auth file (created if missing),
    after checking the result still parses (a duplicate name is refused)."""
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    tenant = Tenant(name=name, key_sha256=hash_token(token), **limits)
    block = ["[[tenant]]"]
    for f in fields(Tenant):
        value = getattr(tenant, f.name)
        if f.name in ("name", "key_sha256") or value != f.default:
            block.append(f"{f.name} = {_toml_value(value)}")
    text = existing + ("\n" if existing and not existing.endswith("\n") else "")
    text += ("\n" if existing else "") + "\n".join(block) + "\n"
    parse_auth_file(text, str(path))  # refuses duplicates before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
    path.write_text(text, encoding="utf-8")
    return tenant


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PermissionDenied(RequestError):
    code = grpc.StatusCode.PERMISSION_DENIED


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class AuthTable:
    """Tenants by key hash; :meth:`authenticate` maps call metadata to a tenant.

    With a ``path``, the file is re-read when it changes (checked at most every
    ``check_interval_s``, on the next call): keys added by ``llmcluster auth new-key``
    work and removed ones stop working without a restart. A change that does not parse
    is logged and the previous tenants stay in force."""

    def __init__(
        self,
        tenants: Iterable[Tenant],
        path: Path | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tenants = list(tenants)
        self.path = path
        self.check_interval_s = check_interval_s
        self.clock = clock
        self._stamp = _file_stamp(path) if path is not None else None
        self._next_check = clock() + check_interval_s

    def _maybe_reload(self) -> None:
        if self.path is None or self.clock() < self._next_check:
            return
        self._next_check = self.clock() + self.check_interval_s
        try:
            stamp = _file_stamp(self.path)
        except OSError as exc:
            logger.error("auth file %s unreadable (%s); keeping its last tenants", self.path, exc)
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.tenants = parse_auth_file(self.path.read_text(encoding="utf-8"), str(self.path))
        except (AuthFileError, OSError, UnicodeDecodeError) as exc:
            logger.error("auth file changed but is not usable, keeping the last tenants: %s", exc)
            return
        logger.info("auth file %s reloaded: %d tenant(s)", self.path, len(self.tenants))

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant:
        """The tenant whose key is the call's bearer token; Unauthenticated otherwise."""
        values = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
        if not values:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'"
            )
        if len(values) > 1:
            raise Unauthenticated("more than one authorization header")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        if token != token.strip() or any(c.isspace() for c in token):
            raise Unauthenticated("malformed bearer token (it contains whitespace)")
        self._maybe_reload()
        digest = hash_token(token).encode("ascii")
        found: Tenant | None = None
        for tenant in self.tenants:  # every key is compared: no early exit
            if hmac.compare_digest(digest, tenant.key_sha256.encode("ascii")):
                found = tenant
        if found is None:
            raise Unauthenticated("unknown API key")
        return found


def set_current_tenant(tenant: Tenant | None) -> None:
    """Sets the caller's tenant for the current task (the HTTP gateway's admission)."""
    _TENANT.set(tenant)


def current_tenant() -> Tenant | None:
    """The authenticated tenant of the RPC being handled (None without an auth file)."""
    return _TENANT.get()


def current_tenant_name() -> str:
    tenant = _TENANT.get()
    return tenant.name if tenant is not None else ""


class Admission:
    """What a quota hook returns for an admitted call: told the call's outcome."""

    def observe(self, response: Any) -> None:
        """Sees each response message (usage arrives on the last)."""

    def release(self) -> None:
        """The call ended (any outcome)."""


QuotaHook = Callable[[Tenant, str], Admission]
"""Called with the tenant and the full method name before the handler runs; raises a
RequestError (RESOURCE_EXHAUSTED with trailing metadata) to refuse the call."""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call of a server (see module docstring).

    Health and reflection stay open unless ``protect_health``: probes (kubelet,
    Consul, load balancers) carry no tokens."""

    def __init__(
        self,
        table: AuthTable,
        *,
        protect_health: bool = False,
        quota: QuotaHook | None = None,
        on_refused: Callable[[str, grpc.StatusCode, str], None] | None = None,
    ) -> None:
        self.table = table
        self.protect_health = protect_health
        self.quota = quota
        # Told (method, code, tenant name or "") of each refused call: the servicer,
        # which counts the others, never sees these.
        self.on_refused = on_refused

    def _open(self, method: str) -> bool:
        service = method.lstrip("/").split("/", 1)[0]
        return not self.protect_health and (
            service == HEALTH_SERVICE or service.startswith(REFLECTION_PREFIX)
        )

    def admit(self, method: str, metadata: Any) -> tuple[Tenant, Admission]:
        """Authenticates one call of ``method`` (token -> tenant, fine-tuning right, quotas);
        raises the RequestError to answer. The HTTP gateway admits through this too."""
        tenant: Tenant | None = None
        try:
            tenant = self.table.authenticate(metadata)
            service, _, _ = method.lstrip("/").partition("/")
            if service == FINETUNE_SERVICE and not tenant.allow_finetune:
                raise PermissionDenied(
                    f"tenant {tenant.name!r} may not use fine-tuning (allow_finetune = false)"
                )
            admission = self.quota(tenant, method) if self.quota is not None else Admission()
        except RequestError as exc:
            if self.on_refused is not None:
                self.on_refused(method.rsplit("/", 1)[-1], exc.code, tenant.name if tenant else "")
            raise
        return tenant, admission

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._open(method):
            return handler
        return _wrap(handler, lambda metadata: self.admit(method, metadata))


async def _refuse(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    trailing = getattr(exc, "trailing_metadata", None)
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    code, message = status_of(exc)
    await context.abort(code, message)


def _wrap(
    handler: grpc.RpcMethodHandler, admit: Callable[[Any], tuple[Tenant, Admission]]
) -> grpc.RpcMethodHandler:
    """The same handler, admitting the call first and setting :func:`current_tenant`.

    The tenant is set inside the handler's own task, so it is visible to the servicer
    and everything it calls; it is not reset (the task ends with the RPC)."""

    async def enter(context: grpc.aio.ServicerContext) -> Admission:
        try:
            tenant, admission = admit(context.invocation_metadata())
        except RequestError as exc:
            await _refuse(context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        _TENANT.set(tenant)
        return admission

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            admission = await enter(context)
            try:
                response = await inner_uu(request, context)
                admission.observe(response)
                return response
            finally:
                admission.release()

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            admission = await enter(context)
            try:
                responses = inner_us(request, context)
                if inspect.isawaitable(responses):  # a handler that writes with context.write
                    await responses
                    return
                async for response in responses:
                    admission.observe(response)
                    yield response
            finally:
                admission.release()

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            admission = await enter(context)
            try:
                return await inner_su(requests, context)
            finally:
                admission.release()

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        admission = await enter(context)
        try:
            responses = inner_ss(requests, context)
            if inspect.isawaitable(responses):  # a handler that writes with context.write
                await responses
                return
            async for response in responses:
                yield response
        finally:
            admission.release()

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )

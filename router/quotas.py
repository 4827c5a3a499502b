"""Per-tenant quotas in router admission: token buckets and a concurrency cap.

Each tenant of the auth file may have ``requests_per_minute``, ``tokens_per_minute``
(prompt + generated) and ``max_concurrent``. They are checked in the auth interceptor,
before the call reaches the servicer, so a refused request costs no queue slot, no
routing and no worker time: a tenant flooding the router is turned away at the door
while other tenants' requests go on through the shared batches.

Buckets hold a minute's worth and refill continuously. The token count of a request is
known only when it ends (the router has no tokenizer and generation may stop early),
so the tokens bucket is charged with each request's usage when it finishes and may go
into debt by the tokens of requests already running; while it is in debt new requests
are refused until it refills. A refusal is RESOURCE_EXHAUSTED naming the limit, with
trailing metadata ``retry-after-ms``: when the limit will admit the next request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.auth import Admission, Tenant
from common.errors import ResourceExhausted

GENERATE_METHODS = frozenset(
    {"/llmcluster.v1.Generate/Generate", "/llmcluster.v1.Generate/GenerateStream"}
)
"""Calls that do generation work: they take a request, count tokens and hold a slot."""
REQUEST_METHODS = GENERATE_METHODS | {"/llmcluster.v1.FineTune/CreateJob"}
"""Calls that take one from ``requests_per_minute``."""
CONCURRENCY_RETRY_MS = 100
"""``retry-after-ms`` when ``max_concurrent`` refuses: a hint, since when a running
request ends is not known in advance."""


class QuotaExceeded(ResourceExhausted):
    """RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailing metadata entry."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = max(1, retry_after_ms)
        self.trailing_metadata = (("retry-after-ms", str(self.retry_after_ms)),)


@dataclass
class TokenBucket:
    """Holds up to ``per_minute``; refills at ``per_minute / 60`` per second."""

    per_minute: int
    level: float
    updated_s: float

    def refill(self, now_s: float) -> None:
        rate = self.per_minute / 60.0
        self.level = min(float(self.per_minute), self.level + (now_s - self.updated_s) * rate)
        self.updated_s = now_s

    def seconds_until(self, level: float) -> float:
        """Time until the bucket holds ``level`` (0 if it does)."""
        return max(0.0, (level - self.level) * 60.0 / self.per_minute)


@dataclass
class _TenantState:
    tenant: Tenant  # the limits the buckets were made for (the auth file may change)
    requests: TokenBucket | None
    tokens: TokenBucket | None
    running: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class _GenerateAdmission(Admission):
    """One admitted generation: its tokens are charged, its slot freed, on the tenant's
    current state (a reloaded auth file may have replaced the one it was admitted on)."""

    def __init__(self, quotas: TenantQuotas, tenant_name: str) -> None:
        self.quotas, self.tenant_name = quotas, tenant_name
        self.released = False

    def observe(self, response: Any) -> None:
        state = self.quotas._states[self.tenant_name]
        if state.tokens is not None and response.HasField("usage"):
            usage = response.usage
            self.quotas.charge_tokens(state, usage.prompt_tokens + usage.completion_tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.quotas._states[self.tenant_name].running -= 1


class TenantQuotas:
    """The quota hook of :class:`~common.auth.AuthInterceptor` (event-loop only: the
    interceptor runs on the server's loop, so no lock is needed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, _TenantState] = {}

    def _state(self, tenant: Tenant) -> _TenantState:
        state = self._states.get(tenant.name)
        if state is None or state.tenant != tenant:
            # New, or its limits changed in a reloaded auth file: fresh buckets; requests
            # already running still count against max_concurrent.
            now = self.clock()
            running = state.running if state is not None else 0
            state = _TenantState(
                tenant=tenant,
                running=running,
                requests=TokenBucket(tenant.requests_per_minute, tenant.requests_per_minute, now)
                if tenant.requests_per_minute
                else None,
                tokens=TokenBucket(tenant.tokens_per_minute, tenant.tokens_per_minute, now)
                if tenant.tokens_per_minute
                else None,
            )
            self._states[tenant.name] = state
        return state

    def running(self, tenant_name: str) -> int:
        state = self._states.get(tenant_name)
        return state.running if state is not None else 0

    def charge_tokens(self, state: _TenantState, tokens: int) -> None:
        if state.tokens is not None:
            state.tokens.refill(self.clock())
            state.tokens.level -= tokens

    def _refuse(self, state: _TenantState, limit: str, message: str, retry_s: float) -> None:
        state.refused[limit] = state.refused.get(limit, 0) + 1
        raise QuotaExceeded(message, math.ceil(retry_s * 1000))

    def __call__(self, tenant: Tenant, method: str) -> Admission:
        """Admits one call of ``tenant`` or raises QuotaExceeded (nothing is taken then)."""
        if method not in REQUEST_METHODS:
            return Admission()
        state = self._state(tenant)
        now = self.clock()
        generate = method in GENERATE_METHODS
        if generate and tenant.max_concurrent and state.running >= tenant.max_concurrent:
            self._refuse(
                state,
                "max_concurrent",
                f"tenant {tenant.name!r} has {state.running} requests running "
                f"(max_concurrent={tenant.max_concurrent}); retry when one finishes",
                CONCURRENCY_RETRY_MS / 1000,
            )
        if state.requests is not None:
            state.requests.refill(now)
            if state.requests.level < 1:
                self._refuse(
                    state,
                    "requests_per_minute",
                    f"tenant {tenant.name!r} is over its request rate "
                    f"(requests_per_minute={tenant.requests_per_minute})",
                    state.requests.seconds_until(1),
                )
        if generate and state.tokens is not None:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                self._refuse(
                    state,
                    "tokens_per_minute",
                    f"tenant {tenant.name!r} is over its token rate "
                    f"(tokens_per_minute={tenant.tokens_per_minute}; "
                    f"{-state.tokens.level:.0f} tokens over)",
                    state.tokens.seconds_until(1),
                )
        if state.requests is not None:
            state.requests.level -= 1
        if not generate:
            return Admission()
        state.running += 1
        return _GenerateAdmission(self, tenant.name)
